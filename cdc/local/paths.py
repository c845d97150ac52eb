"""Where the project's files are: the checkout, the setup SQL, the broker's build files, the monitoring config."""

from __future__ import annotations

from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
KAFKA_POM = PROJECT_DIR / "services" / "kafka" / "pom.xml"
KAFKA_LOG4J = PROJECT_DIR / "services" / "kafka" / "log4j2.properties"
SETUP_SOURCE_SQL = PROJECT_DIR / "setup_db.sql"
SETUP_DEST_SQL = PROJECT_DIR / "setup_db_with_idempotency.sql"
SETUP_ROLES_SOURCE_SQL = PROJECT_DIR / "setup_roles_source.sql"
SETUP_ROLES_DEST_SQL = PROJECT_DIR / "setup_roles_dest.sql"
MONITORING_DIR = PROJECT_DIR / "monitoring"
PROMETHEUS_CONFIG = MONITORING_DIR / "prometheus" / "prometheus.yml"

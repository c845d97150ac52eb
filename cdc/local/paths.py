"""Where the project's files are: the checkout, the setup SQL, the broker's build files, the monitoring config."""

from __future__ import annotations

from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
# A checkout has the daemons' scripts beside the package. An installed package has not: its
# working files (the local services' folder, .env) then go in the current directory.
IN_CHECKOUT = (PROJECT_DIR / "producer.py").is_file() and (PROJECT_DIR / "pyproject.toml").is_file()
WORK_DIR = PROJECT_DIR if IN_CHECKOUT else Path.cwd()
# The module each daemon script runs, for an installed package.
DAEMON_MODULES = {"producer.py": "cdc.source.daemon", "consumer_final.py": "cdc.sink.daemon"}
# The files cdc.local reads, from the package (pyproject.toml's package-data): links to the project's
# own files in a checkout, resolved to them, so both ways they are the same paths; copies in a wheel.
_FILES = Path(__file__).resolve().parent / "files"
KAFKA_POM = (_FILES / "services" / "kafka" / "pom.xml").resolve()
KAFKA_LOG4J = (_FILES / "services" / "kafka" / "log4j2.properties").resolve()
SETUP_SOURCE_SQL = (_FILES / "setup_db.sql").resolve()
SETUP_DEST_SQL = (_FILES / "setup_db_with_idempotency.sql").resolve()
SETUP_ROLES_SOURCE_SQL = (_FILES / "setup_roles_source.sql").resolve()
SETUP_ROLES_DEST_SQL = (_FILES / "setup_roles_dest.sql").resolve()
PROMETHEUS_CONFIG = (_FILES / "monitoring" / "prometheus" / "prometheus.yml").resolve()
# The whole monitoring folder (Grafana too) exists only in a checkout.
MONITORING_DIR = PROJECT_DIR / "monitoring"

"""The Kafka broker's jars: resolved from Maven Central by ``mvn`` once, cached, or ``$KAFKA_HOME/libs``."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from cdc.errors import ServiceError
from cdc.local.paths import KAFKA_POM, WORK_DIR

log = logging.getLogger(__name__)


def kafka_lib_dir() -> Path:
    """Where the resolved broker jars are cached; shared by `make up` and the test fixtures."""
    return Path(os.environ.get("CDC_KAFKA_LIB") or WORK_DIR / ".cdc" / "kafka-lib")


def resolve_kafka_jars(libdir: Path) -> Path:
    """Resolve the broker's jars with Maven into ``libdir`` once; later calls reuse the cache."""
    stamp = libdir / ".resolved"
    pom_text = KAFKA_POM.read_text()
    # The stamp holds the pom it was resolved from, so a version bump re-resolves.
    if stamp.exists() and stamp.read_text() == pom_text:
        return libdir
    mvn = shutil.which("mvn")
    if not mvn:
        raise ServiceError("mvn not found: install Apache Maven (apt-get install maven) or set KAFKA_HOME")
    if not shutil.which("java"):
        raise ServiceError(
            "java not found: install a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"
        )
    log.info("resolving Kafka broker jars with Maven into %s", libdir)
    if libdir.exists():
        shutil.rmtree(libdir)
    libdir.mkdir(parents=True)
    proc = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(KAFKA_POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libdir}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise ServiceError(
            f"mvn could not resolve the Kafka jars: {(proc.stdout + proc.stderr).strip()[-800:]}"
        )
    stamp.write_text(pom_text)
    return libdir

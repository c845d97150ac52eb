"""The installable package and its container, from outside the checkout.

``python -m build`` makes the sdist and the wheel from the Docker build context (the working
tree less what .dockerignore leaves out, as docker.utils.build selects it), so the image's build
stage has what it needs; the wheel is installed with pip into a plain virtualenv (no system
site-packages, no PYTHONPATH), whose console scripts answer ``--help`` and whose ``cdc verify``
reconciles the test services. The Dockerfile's health check is run against a producer from that
virtualenv, and both compose files are validated against the Compose Specification schema
(check-jsonschema's ``vendor.compose-spec``): there is no Docker engine here to run them.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import yaml
from docker.utils.build import exclude_paths
from packaging.requirements import Requirement
from psycopg2.extras import execute_values

pytestmark = pytest.mark.integration

PROJECT_DIR = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "cdc": "cdc.cli.main:main",
    "cdc-producer": "cdc.source.daemon:main",
    "cdc-consumer": "cdc.sink.daemon:main",
}
# What cdc.local reads besides code: in the wheel under cdc/local/files/, at these project paths.
PACKAGE_FILES = (
    "setup_db.sql",
    "setup_db_with_idempotency.sql",
    "setup_roles_source.sql",
    "setup_roles_dest.sql",
    "services/kafka/pom.xml",
    "services/kafka/log4j2.properties",
    "monitoring/prometheus/prometheus.yml",
    "monitoring/prometheus/alerts.yml",
)
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.monitoring.yml")


@dataclass(frozen=True)
class Installed:
    sdist: Path
    wheel: Path
    venv: Path
    workdir: Path  # outside the checkout: the scripts run here

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def _run(args: list[str | os.PathLike[str]], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


def _clean_env(**env: str) -> dict[str, str]:
    """This environment without what would point Python at the checkout or the test venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **env}


def _copy_docker_context(dest: Path) -> None:
    """The files `docker build .` sends, links kept as links."""
    lines = (PROJECT_DIR / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    for name in sorted(exclude_paths(str(PROJECT_DIR), patterns)):
        path, target = PROJECT_DIR / name, dest / name
        if path.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(path))
        elif path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    _copy_docker_context(src)
    dist = root / "dist"
    built = _run([sys.executable, "-m", "build", "--outdir", dist, src])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")

    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", venv])
    assert made.returncode == 0, made.stderr
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q", wheel]
    done = _run(pip, env=_clean_env())
    assert done.returncode == 0, done.stdout + done.stderr
    workdir = root / "work"
    workdir.mkdir()
    return Installed(sdist, wheel, venv, workdir)


def _requirements_txt() -> set[str]:
    lines = (PROJECT_DIR / "requirements.txt").read_text().splitlines()
    return {str(Requirement(ln.split("#")[0])) for ln in lines if ln.split("#")[0].strip()}


def test_pyproject_dependencies_are_requirements_txt():
    project = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]
    assert {str(Requirement(r)) for r in project["dependencies"]} == _requirements_txt()
    assert project["scripts"] == SCRIPTS


def test_wheel_holds_the_package_its_files_and_scripts(installed):
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(f"{dist_info}/METADATA").decode()
        entry_points = whl.read(f"{dist_info}/entry_points.txt").decode()
        files = {name: whl.read(f"cdc/local/files/{name}") for name in PACKAGE_FILES}

    modules = {p.relative_to(PROJECT_DIR).as_posix() for p in (PROJECT_DIR / "cdc").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    # Only the package: no root script, test or bench module.
    assert {n.split("/")[0] for n in names} == {"cdc", dist_info}
    for name, content in files.items():
        assert content == (PROJECT_DIR / name).read_bytes(), name
    requires = {str(Requirement(v)) for k, v in re.findall(r"^(Requires-Dist): (.+)$", metadata, re.M)}
    assert requires == _requirements_txt()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


def test_sdist_holds_the_files_themselves(installed):
    """The links of cdc/local/files/ become the files in the sdist, which builds on its own."""
    with tarfile.open(installed.sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for name in PACKAGE_FILES:
            member = members[f"cdc/local/files/{name}"]
            assert member.isfile(), f"{name} is not a regular file in the sdist"
            extracted = tar.extractfile(member)
            assert extracted is not None
            assert extracted.read() == (PROJECT_DIR / name).read_bytes(), name
        assert "pyproject.toml" in members


def test_console_scripts_answer_help_from_the_virtualenv(installed):
    where = _run(
        [installed.bin("python"), "-c", "import cdc; print(cdc.__file__)"],
        cwd=installed.workdir,
        env=_clean_env(),
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout
    for script, words in {
        "cdc": ("verify", "dlq", "top", "up", "down"),
        "cdc-producer": ("--batch-size",),
        "cdc-consumer": ("--replay-dlq",),
    }.items():
        proc = _run([installed.bin(script), "--help"], cwd=installed.workdir, env=_clean_env())
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
        assert proc.stdout.startswith("usage:"), proc.stdout
        for word in words:
            assert word in proc.stdout, f"{script} --help does not mention {word}"


def test_installed_package_reads_its_files(installed):
    code = (
        "import json, sys\n"
        "from importlib.resources import files\n"
        "names = sys.argv[1:]\n"
        "print(json.dumps({n: (files('cdc.local') / 'files' / n).read_text() for n in names}))\n"
    )
    proc = _run(
        [installed.bin("python"), "-c", code, *PACKAGE_FILES], cwd=installed.workdir, env=_clean_env()
    )
    assert proc.returncode == 0, proc.stderr
    for name, text in json.loads(proc.stdout).items():
        assert text == (PROJECT_DIR / name).read_text(), name


def test_local_services_find_their_files_when_installed(installed):
    """cdc.local.paths names the package's copies, not files of a checkout that is not there."""
    names = ("KAFKA_POM", "KAFKA_LOG4J", "SETUP_SOURCE_SQL", "SETUP_DEST_SQL", "SETUP_ROLES_SOURCE_SQL",
             "SETUP_ROLES_DEST_SQL", "PROMETHEUS_CONFIG")  # fmt: skip
    code = (
        "import sys\n"
        "import cdc.local.paths as paths\n"
        "for name in sys.argv[1:]:\n"
        "    print(name, getattr(paths, name).is_file(), getattr(paths, name))\n"
    )
    proc = _run([installed.bin("python"), "-c", code, *names], cwd=installed.workdir, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    found = [line.split() for line in proc.stdout.splitlines()]
    assert [name for name, _, _ in found] == list(names)
    missing = [path for _, is_file, path in found if is_file != "True"]
    assert not missing, f"not found from the installed package: {missing}"
    assert all(Path(path).is_relative_to(installed.venv) for _, _, path in found), found


def test_an_installed_package_works_in_the_current_directory_and_runs_its_daemons_as_modules(installed):
    """Outside a checkout, the services' folder, .env and the broker jars go under the current
    directory (not site-packages), and the demo starts the daemons from the package."""
    code = (
        "import json, pathlib\n"
        "from cdc.cli.main import build_parser\n"
        "from cdc.local import jars, paths\n"
        "from cdc.local.runner import Daemon\n"
        "args = build_parser().parse_args(['status'])\n"
        "daemon = Daemon('consumer_final.py', {}, pathlib.Path('logs'))\n"
        "print(json.dumps([paths.IN_CHECKOUT, args.home, args.env_file, str(jars.kafka_lib_dir()),"
        " daemon.command()[1:]]))\n"
    )
    proc = _run([installed.bin("python"), "-c", code], cwd=installed.workdir, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    in_checkout, home, env_file, kafka_lib, command = json.loads(proc.stdout)
    work = installed.workdir.resolve()
    assert not in_checkout
    assert (Path(home), Path(env_file), Path(kafka_lib)) == (
        work / ".cdc",
        work / ".env",
        work / ".cdc" / "kafka-lib",
    )
    assert command == ["-m", "cdc.sink.daemon"]


def _service_env(settings) -> dict[str, str]:
    return _clean_env(
        SOURCE_DB_URL=settings.source_db_url,
        DEST_DB_URL=settings.dest_db_url,
        KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        CDC_TOPIC=settings.cdc_topic,
        CDC_DLQ_TOPIC=settings.cdc_dlq_topic,
        CONSUMER_GROUP_ID=settings.consumer_group_id,
    )


def _cdc(installed: Installed, settings, *args: str) -> subprocess.CompletedProcess[str]:
    no_env_file = installed.workdir / "no.env"
    return _run(
        [installed.bin("cdc"), "--env-file", no_env_file, *args],
        cwd=installed.workdir,
        env=_service_env(settings),
    )


def _copy_employees(source_url: str, dest_url: str) -> int:
    with contextlib.closing(psycopg2.connect(source_url)) as src, src.cursor() as cur:
        cur.execute("SELECT * FROM employees")
        columns = ", ".join(d.name for d in cur.description)
        rows = cur.fetchall()
    with contextlib.closing(psycopg2.connect(dest_url)) as dst, dst.cursor() as cur:
        execute_values(cur, f"INSERT INTO employees ({columns}) VALUES %s", rows)
        dst.commit()
    return len(rows)


def test_cdc_verify_from_the_wheel(installed, settings, clean_source, clean_dest):
    load = _cdc(installed, settings, "workload", "--rate", "0", "--writers", "1", "--seed", "7",
                "--max-changes", "200", "--duration", "60")  # fmt: skip
    assert load.returncode == 0, load.stdout + load.stderr
    rows = _copy_employees(clean_source, clean_dest)
    assert rows > 0

    same = _cdc(installed, settings, "verify")
    assert same.returncode == 0, same.stdout + same.stderr
    assert f"result: identical (1 table, {rows} rows)" in same.stdout

    with contextlib.closing(psycopg2.connect(clean_dest)) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM employees WHERE emp_id = (SELECT min(emp_id) FROM employees)")
        conn.commit()
    differ = _cdc(installed, settings, "verify")
    assert differ.returncode == 1, differ.stdout + differ.stderr
    assert "missing in destination: 1 emp_id" in differ.stdout


def _healthcheck_command() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK instruction."""
    text = (PROJECT_DIR / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK ")]
    command = json.loads(line.split(" CMD ", 1)[1])
    assert command[0] == "python", command
    return command


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(installed: Installed, **ports: str) -> int:
    env = {k: v for k, v in _clean_env().items() if not k.endswith("METRICS_PORT")}
    command = [str(installed.bin("python")), *_healthcheck_command()[1:]]
    return _run(command, cwd=installed.workdir, env={**env, **ports}).returncode


@contextlib.contextmanager
def _http_server(status: int) -> Iterator[int]:
    """A server answering every GET with ``status``; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_docker_health_check_asks_the_daemons_live_endpoint(installed, settings, clean_source, tmp_path):
    producer_port, unused_port = _free_port(), _free_port()
    env = _service_env(settings) | {
        "METRICS_PORT": str(unused_port),
        "PRODUCER_METRICS_PORT": str(producer_port),
    }
    with open(tmp_path / "producer.log", "wb") as log:
        proc = subprocess.Popen(
            [installed.bin("cdc-producer")],
            cwd=installed.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while _health(installed, METRICS_PORT=str(unused_port), PRODUCER_METRICS_PORT=str(producer_port)):
            assert proc.poll() is None, (tmp_path / "producer.log").read_text()
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.5)
        # Only the port the daemon serves counts: METRICS_PORT alone is nobody's.
        assert _health(installed, METRICS_PORT=str(unused_port)) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert _health(installed, METRICS_PORT=str(unused_port), PRODUCER_METRICS_PORT=str(producer_port)) == 1
    assert _health(installed) == 1  # no port set

    with _http_server(503) as stalled, _http_server(200) as live:
        assert _health(installed, CONSUMER_METRICS_PORT=str(stalled)) == 1
        assert _health(installed, CONSUMER_METRICS_PORT=str(live)) == 0


def _check_compose(*files: Path) -> subprocess.CompletedProcess[str]:
    schema = ["--builtin-schema", "vendor.compose-spec"]
    return _run([sys.executable, "-m", "check_jsonschema", *schema, *files])


def test_compose_files_follow_the_compose_specification(tmp_path):
    proc = _check_compose(*(PROJECT_DIR / name for name in COMPOSE_FILES))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # The check can fail: a misspelt key in a service is refused.
    compose = yaml.safe_load((PROJECT_DIR / "docker-compose.yml").read_text())
    compose["services"]["producer"]["enviroment"] = compose["services"]["producer"].pop("environment")
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(compose))
    assert _check_compose(tmp_path / "broken.yml").returncode == 1


def test_compose_pipeline_profile_runs_the_image_against_the_compose_services():
    compose = yaml.safe_load((PROJECT_DIR / "docker-compose.yml").read_text())
    services = compose["services"]
    kafka_env = services["kafka"]["environment"]
    advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    (image_port,) = re.findall(r"\bMETRICS_PORT=(\d+)", (PROJECT_DIR / "Dockerfile").read_text())
    for name, script, db_var, db_service in (
        ("producer", "cdc-producer", "SOURCE_DB_URL", "db_source"),
        ("consumer", "cdc-consumer", "DEST_DB_URL", "db_dst"),
    ):
        service = services[name]
        assert service["profiles"] == ["pipeline"]
        assert (PROJECT_DIR / service["build"] / "Dockerfile").is_file()
        assert service["command"] == [script] and script in SCRIPTS
        bootstrap = service["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
        assert any(listener.endswith(f"//{bootstrap}") for listener in advertised), bootstrap
        assert f"@{db_service}:5432/" in service["environment"][db_var]
        assert set(service["depends_on"]) == {"kafka", db_service}
        assert all(dep["condition"] == "service_healthy" for dep in service["depends_on"].values())
        assert [p.split(":")[-1] for p in service["ports"]] == [image_port]
    # The base services need no profile: `docker compose up` still starts just them.
    assert all("profiles" not in services[s] for s in ("kafka", "db_source", "db_dst"))

"""One local PostgreSQL server: initdb, start, stop, status, and running a setup SQL file.

The binaries are Debian's (``/usr/lib/postgresql/<v>/bin``) or ``$PG_BIN``. PostgreSQL refuses to
run as root, so as root every server command runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

from cdc.errors import ServiceError
from cdc.local.ports import port_open
from cdc.local.processes import START_TIMEOUT, STOP_TIMEOUT, pid_alive, read_pid
from cdc.local.tls import Certificates

PG_USER = "postgres"


class PostgresServer:
    """One PostgreSQL cluster in ``datadir`` listening on 127.0.0.1:``port``."""

    def __init__(
        self,
        *,
        name: str,
        home: Path,
        port: int,
        dbname: str,
        password: str,
        settings: dict[str, str] | None = None,
        tls: Certificates | None = None,
    ) -> None:
        self.name = name
        self.settings = dict(settings or {})  # extra server settings (-c name=value) at start
        self.tls = tls  # TLS on, with this server certificate
        self.datadir = home / f"pg-{name}"
        self.logfile = home / "logs" / f"pg-{name}.log"
        self.port = port
        self.dbname = dbname
        self.password = password
        self._bindir: Path | None = None

    @property
    def url(self) -> str:
        """The URL clients use: with TLS, ``sslmode=verify-full`` against the local CA."""
        url = self._url(self.dbname)
        if self.tls:
            url += f"?sslmode=verify-full&sslrootcert={quote(str(self.tls.ca), safe='/')}"
        return url

    def _url(self, dbname: str, user: str = PG_USER, password: str | None = None) -> str:
        secret = quote(self.password if password is None else password, safe="")
        return f"postgresql://{user}:{secret}@127.0.0.1:{self.port}/{dbname}"

    def url_as(self, user: str, password: str) -> str:
        """``url`` for another role (TLS parameters kept)."""
        return self._url(self.dbname, user, password) + self.url[len(self._url(self.dbname)) :]

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    def _run(
        self, *args: str, check: bool = True, timeout: float = START_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise ServiceError(
                f"postgres {self.name}: {' '.join(args[:2])} failed: "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
            )
        return proc

    def pid(self) -> int | None:
        pid = read_pid(self.datadir / "postmaster.pid")
        return pid if pid and pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def init(self) -> None:
        if (self.datadir / "PG_VERSION").exists():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        pwfile = self.datadir.parent / f".pw-{self.name}"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        try:
            if os.geteuid() == 0:
                pg = pwd.getpwnam("postgres")
                for path in (self.datadir, pwfile):
                    os.chown(path, pg.pw_uid, pg.pw_gid)
                _make_traversable(self.datadir.parent)
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                PG_USER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# cdc local service\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.datadir}'\n"
                "max_connections = 200\n"
                # Speed for a throwaway dev server: these only matter if the machine itself
                # crashes. synchronous_commit stays on, so a killed server loses no commit.
                "fsync = off\n"
                "full_page_writes = off\n"
                "shared_buffers = 128MB\n"
            )

    def start(self) -> None:
        if self.running():
            return
        if port_open(self.port):
            raise ServiceError(
                f"postgres {self.name}: port {self.port} is already in use by another program; "
                f"choose another with CDC_{self.name.upper()}_PG_PORT"
            )
        self.init()
        settings = dict(self.settings)
        if self.tls:
            # The server reads its key only if the server's user owns it with mode 0600.
            for src, dst in ((self.tls.cert, "server.crt"), (self.tls.key, "server.key")):
                shutil.copyfile(src, self.datadir / dst)
                (self.datadir / dst).chmod(0o600)
                if os.geteuid() == 0:
                    pg = pwd.getpwnam("postgres")
                    os.chown(self.datadir / dst, pg.pw_uid, pg.pw_gid)
            settings.update({"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"})
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            self.logfile.parent.mkdir(parents=True, exist_ok=True)
            self.logfile.touch()
            os.chown(self.logfile, pg.pw_uid, pg.pw_gid)
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-o",
            # Prepared transactions on: the producer's horizon warning must be testable with one.
            " ".join(
                [f"-p {self.port} -c max_prepared_transactions=10"]
                + [f"-c {k}={v}" for k, v in settings.items()]
            ),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
        )
        self._ensure_database()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server. ``mode`` is pg_ctl's: smart, fast or immediate (a crash, no checkpoint)."""
        if not self.running():
            return
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(STOP_TIMEOUT)),
            "stop",
            timeout=STOP_TIMEOUT + 10,
        )

    def _ensure_database(self) -> None:
        import psycopg2
        from psycopg2 import sql

        with contextlib.closing(psycopg2.connect(self._url("postgres"))) as conn:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))

    def apply_sql(self, path: Path) -> None:
        apply_sql(self.url, path)

    def status(self) -> str:
        pid = self.pid()
        state = f"running pid={pid}" if pid else "stopped"
        return (
            f"postgres-{self.name:<6} {state:<22} 127.0.0.1:{self.port} db={self.dbname} data={self.datadir}"
        )


def apply_sql(url: str, path: Path) -> None:
    """Run a setup SQL file in one round trip; its own BEGIN/COMMIT make it one transaction."""
    import psycopg2

    with contextlib.closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(path.read_text())


def _make_traversable(path: Path) -> None:
    """Let the postgres user reach a data dir below a root-owned folder."""
    for p in [path, *path.parents]:
        try:
            mode = p.stat().st_mode
            if not mode & 0o001:
                p.chmod(mode | 0o001)
        except OSError:
            pass


def find_pg_bindir() -> Path:
    """Where initdb/pg_ctl/postgres live: $PG_BIN, else the newest Debian install."""
    env = os.environ.get("PG_BIN")
    candidates = [Path(env)] if env else []
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version_key(p.parent.name), reverse=True
    )
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(Path(os.path.realpath(pg_ctl)).parent)
    for c in candidates:
        if (c / "postgres").exists() and (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    raise ServiceError(
        "PostgreSQL server binaries not found: install them (apt-get install postgresql) or set PG_BIN"
    )


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in name.split("."))
    except ValueError:
        return (0,)

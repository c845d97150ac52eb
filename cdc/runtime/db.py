"""A small PostgreSQL connection pool around psycopg2's ThreadedConnectionPool.

``with db.connection() as conn:`` commits on success, rolls back on error and always gives the
connection back; a connection that broke is closed instead of returned, so the next caller gets
a fresh one after a server restart. Errors are sorted into the pipeline's kinds by
``classify()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.errorcodes
import psycopg2.extensions
from psycopg2.pool import PoolError, ThreadedConnectionPool

from cdc.errors import BadMessageError, CDCError, ConfigError, SchemaMissingError, TransientError
from cdc.runtime.settings import redact_url

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10
# Detect a dead server or network within about a minute instead of the kernel's two hours.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

# SQLSTATE classes and codes worth retrying unchanged.
_TRANSIENT_CLASSES = ("08", "53", "57", "58")  # connection, resources, operator intervention, system
_TRANSIENT_CODES = {
    psycopg2.errorcodes.SERIALIZATION_FAILURE,
    psycopg2.errorcodes.DEADLOCK_DETECTED,
    psycopg2.errorcodes.LOCK_NOT_AVAILABLE,
    psycopg2.errorcodes.READ_ONLY_SQL_TRANSACTION,  # a failover in progress
}
# Errors that belong to one message's data, not to the database.
_DATA_CLASSES = ("22", "23")  # data exception, integrity constraint violation
# Connection failures that no wait fixes (libpq reports them without a SQLSTATE).
_FATAL_CONNECT = (
    "authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "no password supplied",
    # TLS: an untrusted or mismatched server certificate, a missing CA file, no TLS on the server.
    "certificate verify failed",
    "root certificate file",
    "does not match host name",
    "does not support SSL",
    "invalid sslmode",
)
_SCHEMA_CODES = {
    psycopg2.errorcodes.UNDEFINED_TABLE,
    psycopg2.errorcodes.UNDEFINED_COLUMN,
    psycopg2.errorcodes.UNDEFINED_FUNCTION,
}


def classify(exc: BaseException) -> CDCError | None:
    """Map a psycopg2 error to TransientError / BadMessageError / SchemaMissingError, else None.

    None means "a bug or a setup problem": the caller should stop loudly.
    """
    if isinstance(exc, CDCError):
        return exc
    if isinstance(exc, PoolError):
        return TransientError(f"connection pool: {exc}", "connection")
    if not isinstance(exc, psycopg2.Error):
        return None
    code = exc.pgcode or ""
    text = _one_line(exc)
    if code in _TRANSIENT_CODES or code[:2] in _TRANSIENT_CLASSES:
        return TransientError(text, _transient_kind(code))
    if code in _SCHEMA_CODES:
        return SchemaMissingError(f"{text} (run the setup SQL, e.g. `make up`)")
    if code == psycopg2.errorcodes.INSUFFICIENT_PRIVILEGE:
        return ConfigError(
            f"{text}: the daemon's role lacks this grant (setup_roles_source.sql / setup_roles_dest.sql "
            "list what each daemon needs)"
        )
    if code[:2] in _DATA_CLASSES:
        return BadMessageError(text)
    # No SQLSTATE: the connection itself failed. A wrong password or database name will not
    # get better by waiting; a server that is gone or restarting will.
    if not code and isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        if any(marker in text for marker in _FATAL_CONNECT):
            return ConfigError(text)
        return TransientError(text, "connection")
    return None


def _transient_kind(code: str) -> str:
    if code == psycopg2.errorcodes.READ_ONLY_SQL_TRANSACTION:
        return "failover"
    if code in _TRANSIENT_CODES:
        return "conflict"
    return "connection" if code[:2] == "08" else "server"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def one_row(cur: psycopg2.extensions.cursor) -> tuple[Any, ...]:
    """The row of a statement that always returns exactly one (an aggregate, a RETURNING)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError(f"no row from: {cur.query!r}")
    return row


class Database:
    """A pool of connections to one PostgreSQL database."""

    def __init__(
        self,
        dsn: str,
        *,
        minconn: int = 1,
        maxconn: int = 10,
        statement_timeout_ms: int = 30000,
        application_name: str = "cdc",
    ) -> None:
        if not dsn:
            raise ConfigError("database URL is empty (set SOURCE_DB_URL / DEST_DB_URL, or run `make up`)")
        if not 1 <= minconn <= maxconn:
            raise ConfigError(f"pool size min={minconn} max={maxconn} is not valid")
        try:
            psycopg2.extensions.parse_dsn(dsn)
        except psycopg2.ProgrammingError as exc:
            raise ConfigError(f"database URL {redact_url(dsn)} is not valid: {_one_line(exc)}") from None
        self.dsn = dsn
        self.minconn = minconn
        self.maxconn = maxconn
        self._kwargs = {
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": application_name,
            "options": f"-c statement_timeout={statement_timeout_ms}",
            **KEEPALIVES,
        }
        self._pool: ThreadedConnectionPool | None = None

    def __repr__(self) -> str:
        return f"Database({redact_url(self.dsn)})"

    @property
    def url(self) -> str:
        return redact_url(self.dsn)

    def open(self) -> None:
        """Create the pool (connecting ``minconn`` connections). Raises TransientError if unreachable."""
        if self._pool is not None:
            return
        try:
            self._pool = ThreadedConnectionPool(self.minconn, self.maxconn, self.dsn, **self._kwargs)
        except psycopg2.Error as exc:
            err = classify(exc)
            if isinstance(err, TransientError):
                raise err from exc
            raise ConfigError(f"cannot connect to {self.url}: {_one_line(exc)}") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.closeall()
            self._pool = None

    def __enter__(self) -> Database:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def in_use(self) -> int:
        """Connections checked out of the pool now (psycopg2's pool keeps them in ``_used``)."""
        pool = self._pool
        return len(pool._used) if pool is not None else 0  # type: ignore[attr-defined]

    @contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        """A pooled connection in a transaction: committed on success, rolled back on error.

        psycopg2 errors leave as the pipeline's kinds (see ``classify``), chained to the cause.
        """
        self.open()
        assert self._pool is not None
        try:
            conn = self._pool.getconn()
        except psycopg2.Error as exc:
            raise (classify(exc) or exc) from exc
        broken = False
        try:
            yield conn
            conn.commit()
        except BaseException as exc:
            broken = conn.closed != 0 or isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
            if not broken:
                try:
                    conn.rollback()
                except psycopg2.Error:
                    broken = True
            if isinstance(exc, psycopg2.Error):
                mapped = classify(exc)
                if mapped is not None:
                    raise mapped from exc
            raise
        finally:
            # A broken connection is closed, not returned: the pool opens a new one next time.
            self._pool.putconn(conn, close=broken or conn.closed != 0)

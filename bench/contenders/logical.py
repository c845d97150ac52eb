"""PostgreSQL's own logical replication as a contender (the ceiling): a publication on the
source, a subscription on the destination; ``copy_data`` does the initial load."""

from __future__ import annotations

import contextlib

import psycopg2
import psycopg2.extensions

from bench.contenders.base import BenchEnv

NAME = "bench_sub"


def _run(url: str, statement: str, params: tuple = ()) -> list[tuple]:
    with contextlib.closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True  # CREATE/ALTER/DROP SUBSCRIPTION refuse a transaction block
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []


class Logical:
    name = "logical"
    uses_kafka = False
    needs_outbox = False

    def __init__(self) -> None:
        self.env: BenchEnv | None = None
        self._pids: dict[str, int] = {}

    def prepare(self) -> None:
        pass

    def setup(self, env: BenchEnv, *, initial_load: bool) -> None:
        self.env = env
        dsn = psycopg2.extensions.parse_dsn(env.source_url)
        conninfo = " ".join(f"{k}={v}" for k, v in dsn.items())
        _run(env.source_url, "CREATE PUBLICATION bench_pub FOR TABLE employees")
        # enabled = false still creates the slot now: every later change is kept for us.
        copy = "true" if initial_load else "false"
        _run(
            env.dest_url,
            f"CREATE SUBSCRIPTION {NAME} CONNECTION %s PUBLICATION bench_pub"
            f" WITH (copy_data = {copy}, enabled = false)",
            (conninfo,),
        )

    def resume(self) -> None:
        assert self.env is not None
        _run(self.env.dest_url, f"ALTER SUBSCRIPTION {NAME} ENABLE")

    def processes(self) -> dict[str, int]:
        assert self.env is not None
        if len(self._pids) < 2:
            for (pid,) in _run(
                self.env.dest_url,
                "SELECT pid FROM pg_stat_subscription WHERE subname = %s"
                " AND relid IS NULL AND pid IS NOT NULL",
                (NAME,),
            ):
                self._pids["apply worker"] = pid
            for (pid,) in _run(
                self.env.source_url,
                "SELECT pid FROM pg_stat_replication WHERE application_name = %s",
                (NAME,),
            ):
                self._pids["walsender"] = pid
        return dict(self._pids)

    def check_alive(self) -> None:
        pass

    def stop(self) -> None:
        if self.env is None:
            return
        with contextlib.suppress(psycopg2.Error):
            _run(self.env.dest_url, f"DROP SUBSCRIPTION IF EXISTS {NAME}")
        self.env = None

"""Benchmark ``python -m cdc verify --events``: wall time and peak memory (``make bench-verify``).

Starts two private PostgreSQL servers in a temporary folder (it never touches your databases),
fills both tables set-based with generate_series (the source trigger writes the outbox; the
destination gets one ``processed_events`` row per action_id), plants a few differences, and runs
``verify`` as a subprocess at two sizes, so you can see that memory does not grow with the table.
Results go to ``bench-results/verify.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2
from psycopg2 import sql

from bench import tables
from cdc.local.paths import PROJECT_DIR, SETUP_DEST_SQL, SETUP_SOURCE_SQL
from cdc.local.ports import Ports
from cdc.local.postgres import PostgresServer
from cdc.model.table import SOURCE_TABLE, Kind, Table


def source_fill(table: Table) -> sql.Composable:
    """One deterministic row per g, the same in both databases (NULLs, non-ASCII text, dates);
    the source's sequence gives the key, 1.. as on the destination."""
    return tables.fill(table, key=False, nulls=True)


def dest_fill(table: Table) -> sql.Composable:
    return sql.SQL("{fill}; {decided}").format(
        fill=tables.fill(table, key=True, nulls=True),
        decided=sql.SQL(
            "INSERT INTO processed_events (action_id, {k}, action, outcome)"
            " SELECT g, g, 'INSERT', 'applied' FROM generate_series(%(lo)s, %(hi)s) AS g"
        ).format(k=table.key.ident),
    )


def plant(table: Table) -> sql.Composable:
    """After the first round: 3 changed, 2 missing, 2 extra rows; 4 action_ids never processed."""
    integer = next(c for c in table.values if c.kind is Kind.INTEGER)
    return sql.SQL(
        "UPDATE {t} SET {c} = coalesce({c}, 0) + 1 WHERE {k} IN (11, %(first)s / 2, %(first)s - 3);"
        " DELETE FROM {t} WHERE {k} IN (42, %(first)s - 1);"
        " INSERT INTO {t} ({k}) VALUES (%(rows)s + 1), (%(rows)s + 2);"
        " DELETE FROM processed_events WHERE action_id IN (1, 2, 3, 4);"
    ).format(t=table.ident, c=integer.ident, k=table.key.ident)


def _execute(url: str, statement: Callable[[Table], sql.Composable], params: dict[str, int]) -> float:
    """Run ``statement`` made for the table as the database's catalog has it."""
    started = time.monotonic()
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        cur.execute(statement(Table.load(cur, SOURCE_TABLE)), params)
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE")
    return time.monotonic() - started


def _run_verify(env: dict[str, str]) -> dict[str, object]:
    """Run verify as a child process; its own peak RSS comes from wait4."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc", "--env-file", os.devnull, "verify", "--events"],
        cwd=PROJECT_DIR,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "seconds": round(time.monotonic() - started, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "exit_code": proc.returncode,
        "output": output.strip().splitlines(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--first", type=int, default=100_000, help="rows of the first, smaller round")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="cdc-bench-") as tmp:
        home = Path(tmp)
        ports = Ports.free()
        source = PostgresServer(
            name="source", home=home, port=ports.source_pg, dbname="cdc_source", password="bench"
        )
        dest = PostgresServer(name="dest", home=home, port=ports.dest_pg, dbname="cdc_dest", password="bench")
        try:
            source.start()
            dest.start()
            source.apply_sql(SETUP_SOURCE_SQL)
            dest.apply_sql(SETUP_DEST_SQL)
            env = {"SOURCE_DB_URL": source.url, "DEST_DB_URL": dest.url}
            done = 0
            for size in (args.first, args.rows):
                span = {"lo": done + 1, "hi": size}
                fill = _execute(source.url, source_fill, span) + _execute(dest.url, dest_fill, span)
                if done == 0:
                    _execute(dest.url, plant, {"first": args.first, "rows": args.rows})
                done = size
                run = {"rows": size, "fill_seconds": round(fill, 1), **_run_verify(env)}
                results.append(run)
                print(
                    f"{size:>9} rows: verify --events {run['seconds']:.2f}s, peak RSS {run['peak_rss_mib']} MiB,"
                    f" exit {run['exit_code']} (fill {run['fill_seconds']}s)"
                )
                for line in run["output"]:
                    print(f"    {line}")
        finally:
            for server in (source, dest):
                server.stop(mode="immediate")

    out = PROJECT_DIR / "bench-results" / "verify.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "runs": results}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out.relative_to(PROJECT_DIR)}")
    # The planted differences must be found: 3 changed, 2 missing, 2 extra, 4 unprocessed.
    return 0 if all(r["exit_code"] == 1 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

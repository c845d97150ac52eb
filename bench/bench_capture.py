"""What capture costs a writer (``make bench-capture``): transactions per second of single-row
INSERTs into a table without any trigger against the same table captured.

Starts a private PostgreSQL server in a temporary folder (it never touches your databases),
applies setup_db.sql, and measures with PostgreSQL's own ``pgbench`` (so the client's cost is
the same for every variant), alternating the variants round by round so the machine's drift hits
them alike:

- a 10-column table (bigint key, integers, text, numeric, timestamptz, date, bool, float8)
  without a trigger, and the same table captured by the generic trigger (``cdc tables add``);
- ``employees`` with its own capture trigger, and a copy of it without one: the seed's figure,
  for comparison.

Twice: on a durable server (``fsync`` and ``full_page_writes`` on, as in production: a commit
waits for its WAL flush) and on the local services' throwaway setting (both off: the trigger's
CPU cost alone, the worst case for the ratio). Each variant's median over the rounds, and the
ratios captured / plain. Results go to ``bench-results/capture.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2

from cdc.local.paths import PROJECT_DIR, SETUP_SOURCE_SQL
from cdc.local.ports import Ports
from cdc.local.postgres import PG_USER, PostgresServer, find_pg_bindir
from cdc.ops import tables
from cdc.runtime.settings import Settings

COLUMNS = (
    "id bigserial PRIMARY KEY, c1 int, c2 int, c3 bigint, c4 text, c5 text, c6 numeric,"
    " c7 timestamptz, c8 date, c9 bool"
)
INSERT_10 = (
    "INSERT INTO {t} (c1, c2, c3, c4, c5, c6, c7, c8, c9)"
    " VALUES (:n, 2, 3000000000, 'some text', 'a longer piece of text, about forty chars', 12345.678,"
    " now(), current_date, true);"
)
INSERT_EMP = "INSERT INTO {t} (first_name, last_name, dob, city, salary) VALUES ('Ada', 'Lovelace', '1815-12-10', 'London', :n);"
# variant -> (table, insert template)
VARIANTS = {
    "10 columns, no trigger": ("wide_plain", INSERT_10),
    "10 columns, generic trigger": ("wide_captured", INSERT_10),
    "employees, no trigger": ("employees_plain", INSERT_EMP),
    "employees, its trigger": ("employees", INSERT_EMP),
}
RATIOS = {
    "generic trigger / none (10 columns)": ("10 columns, generic trigger", "10 columns, no trigger"),
    "employees trigger / none": ("employees, its trigger", "employees, no trigger"),
}


def prepare(server: PostgresServer) -> None:
    server.apply_sql(SETUP_SOURCE_SQL)
    with psycopg2.connect(server.url) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE wide_plain ({COLUMNS})")
        cur.execute(f"CREATE TABLE wide_captured ({COLUMNS})")
        cur.execute("CREATE TABLE employees_plain (LIKE employees INCLUDING ALL)")
    conn.close()
    tables.add(Settings(source_db_url=server.url), ["wide_captured"])


def pgbench(server: PostgresServer, script: Path, clients: int, seconds: int) -> float:
    """Transactions per second of ``script`` run by ``clients`` for ``seconds``."""
    proc = subprocess.run(
        [
            str(find_pg_bindir() / "pgbench"),
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            str(server.port),
            "-U",
            PG_USER,
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-T",
            str(seconds),
            "-f",
            str(script),
            server.dbname,
        ],
        env={**os.environ, "PGPASSWORD": server.password},
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", proc.stdout)
    if found is None:
        raise RuntimeError(f"pgbench printed no tps: {proc.stdout}{proc.stderr}")
    return float(found.group(1))


CONFIGS = {
    "durable (fsync on)": {"fsync": "on", "full_page_writes": "on"},
    "fsync off": {},
}


def measure(home: Path, config: dict[str, str], args: argparse.Namespace) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    server = PostgresServer(
        name="source",
        home=home,
        port=Ports.free().source_pg,
        dbname="cdc_source",
        password="bench",
        settings=config,
    )
    try:
        server.start()
        prepare(server)
        scripts = {}
        for variant, (table, template) in VARIANTS.items():
            scripts[variant] = home / f"{table}.sql"
            scripts[variant].write_text("\\set n random(1, 100000)\n" + template.format(t=table) + "\n")
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                tps = pgbench(server, scripts[variant], args.clients, args.seconds)
                runs[variant].append(tps)
                print(f"round {r + 1}: {variant}: {tps:,.0f} transactions/s", flush=True)
    finally:
        server.stop(mode="immediate")
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10, help="per variant and round")
    parser.add_argument("--clients", type=int, default=2, help="concurrent writers")
    args = parser.parse_args()

    results = {}
    for name, config in CONFIGS.items():
        print(f"== {name}", flush=True)
        with tempfile.TemporaryDirectory(prefix="cdc-bench-") as tmp:
            runs = measure(Path(tmp), config, args)
        medians = {v: statistics.median(t) for v, t in runs.items()}
        ratios = {label: round(medians[a] / medians[b], 3) for label, (a, b) in RATIOS.items()}
        results[name] = {"runs": runs, "medians": medians, "ratios": ratios}
    for name, result in results.items():
        for variant, median in result["medians"].items():
            print(f"{name}: median {variant}: {median:,.0f} transactions/s")
        for label, ratio in result["ratios"].items():
            print(f"{name}: {label}: {ratio}")
    out = PROJECT_DIR / "bench-results" / "capture.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "clients": args.clients, **results}, indent=1) + "\n")
    print(f"wrote {out.relative_to(PROJECT_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

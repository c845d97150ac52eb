"""Self-check of the Debezium contender (``python bench/check_debezium.py``).

Starts private services (two PostgreSQL servers with logical decoding, one Kafka broker) on free
ports under a temporary folder, creates ``employees`` on both, and drives ``Debezium`` through
setup -> changes -> resume until the destination's rows equal the source's, once without and
once with an initial load. Prints one line per mode with the drain rate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.contenders.base import BenchEnv
from bench.contenders.debezium import Debezium
from cdc.services import LocalServices, Ports

PG_SETTINGS = {"wal_level": "logical", "track_commit_timestamp": "on"}

# The table of setup_db.sql, without the outbox and its trigger.
EMPLOYEES_DDL = """
CREATE TABLE IF NOT EXISTS employees (
    emp_id      SERIAL PRIMARY KEY,
    first_name  VARCHAR(100),
    last_name   VARCHAR(100),
    dob         DATE,
    city        VARCHAR(100),
    salary      INTEGER
)
"""

ROWS_DIGEST = (
    "SELECT count(*), md5(coalesce(string_agg(e::text, E'\\n' ORDER BY emp_id), '')) FROM employees e"
)

NAMES = ["Ada", "Alan", "Grace", "Zoë", "José", "Åsa", "李", "O'Brien", "", None]
CITIES = ["London", "Oslo", "Zürich", "São Paulo", "東京", "", None]
DATES = ["1815-12-10", "1969-12-31", "1970-01-01", "2000-02-29", "1900-03-01", "2024-06-30", None]


def _row(rnd: random.Random, emp_id: int) -> tuple:
    return (
        emp_id,
        rnd.choice(NAMES),
        rnd.choice(NAMES),
        rnd.choice(DATES),
        rnd.choice(CITIES),
        None if rnd.random() < 0.1 else rnd.randint(-5, 250_000),
    )


def write_changes(url: str, changes: int, *, first_id: int = 1, per_txn: int = 10, seed: int = 7) -> float:
    """``changes`` single-row changes (about 50 % INSERT, 35 % UPDATE, 15 % DELETE), committed
    ``per_txn`` to a transaction. Returns the seconds taken."""
    rnd = random.Random(seed)
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT emp_id FROM employees ORDER BY emp_id")
        alive = [r[0] for r in cur.fetchall()]
        conn.commit()
        next_id = max([first_id - 1, *alive]) + 1
        started = time.monotonic()
        for n in range(changes):
            roll = rnd.random()
            if not alive or roll < 0.5:
                cur.execute("INSERT INTO employees VALUES (%s, %s, %s, %s, %s, %s)", _row(rnd, next_id))
                alive.append(next_id)
                next_id += 1
            elif roll < 0.85:
                emp_id = alive[rnd.randrange(len(alive))]
                row = _row(rnd, emp_id)
                cur.execute(
                    "UPDATE employees SET first_name = %s, last_name = %s, dob = %s, city = %s, salary = %s"
                    " WHERE emp_id = %s",
                    (*row[1:], emp_id),
                )
            else:
                i = rnd.randrange(len(alive))
                alive[i], alive[-1] = alive[-1], alive[i]
                cur.execute("DELETE FROM employees WHERE emp_id = %s", (alive.pop(),))
            if (n + 1) % per_txn == 0:
                conn.commit()
        conn.commit()
        return time.monotonic() - started


def load_rows(url: str, rows: int) -> None:
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO employees"
            " SELECT g, 'First' || g, CASE WHEN g %% 20 = 0 THEN NULL ELSE 'Last' || (g %% 997) END,"
            "        CASE WHEN g %% 13 = 0 THEN NULL ELSE date '1815-12-10' + (g %% 70000) END,"
            "        (ARRAY['London', 'Oslo', 'Zürich', '東京', ''])[1 + g %% 5],"
            "        CASE WHEN g %% 17 = 0 THEN NULL ELSE 30000 + g %% 200000 END"
            "   FROM generate_series(1, %s) AS g",  # %% is a literal % next to a parameter
            (rows,),
        )
        conn.commit()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` so far (0 when unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def digest(url: str) -> tuple[int, str]:
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        cur.execute(ROWS_DIGEST)
        count, md5 = cur.fetchone()
        return count, md5


def wait_equal(contender: Debezium, source_url: str, dest_url: str, timeout: float) -> float:
    target = digest(source_url)
    deadline = time.monotonic() + timeout
    with contextlib.closing(psycopg2.connect(dest_url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            while True:
                cur.execute(ROWS_DIGEST)
                count, md5 = cur.fetchone()
                now = time.monotonic()
                if (count, md5) == target:
                    return now
                if now > deadline:
                    raise TimeoutError(
                        f"destination not equal after {timeout:.0f} s ({count} of {target[0]} rows)"
                    )
                contender.check_alive()
                time.sleep(0.1)


def _timed(contender: Debezium, env: BenchEnv, timeout: float) -> tuple[float, float, float]:
    """resume(), then wait until equal: (seconds to equal, seconds resume() took, JVM CPU seconds)."""
    pid = contender.processes().get("connect")
    cpu = cpu_seconds(pid)
    started = time.monotonic()
    contender.resume()
    resumed = time.monotonic() - started
    seen = wait_equal(contender, env.source_url, env.dest_url, timeout)
    return seen - started, resumed, cpu_seconds(pid) - cpu


def run(mode: str, args: argparse.Namespace) -> bool:
    initial_load = mode == "initial-load"
    home = Path(tempfile.mkdtemp(prefix=f"cdc-check-debezium-{mode}-"))
    services = LocalServices(home=home, ports=Ports.free(), pg_settings=PG_SETTINGS)
    contender = Debezium(
        batch_size=args.batch_size,
        source_overrides=dict(kv.split("=", 1) for kv in args.source_set),
        sink_overrides=dict(kv.split("=", 1) for kv in args.sink_set),
    )
    ok = False
    try:
        services.up(apply_schema=False)
        for url in (services.source.url, services.dest.url):
            with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
                cur.execute(EMPLOYEES_DDL)
                conn.commit()
        env = BenchEnv(
            home=home,
            source_url=services.source.url,
            dest_url=services.dest.url,
            bootstrap=services.kafka.bootstrap,
            env=services.env(),
        )
        contender.prepare()
        if initial_load:
            # The rows exist first: set-based, then changed a little (NULLs, old dates, empty strings).
            load_rows(env.source_url, args.rows)
            write_changes(env.source_url, min(args.rows, 2000), seed=11, per_txn=100)
            count = digest(env.source_url)[0]
        t = time.monotonic()
        contender.setup(env, initial_load=initial_load)
        print(f"  setup {time.monotonic() - t:.1f} s", flush=True)
        if not initial_load:
            wrote = write_changes(env.source_url, args.changes)
            print(f"  {args.changes} changes written in {wrote:.1f} s while paused", flush=True)
        if args.pause:
            print(f"  waiting {args.pause:.0f} s before resume()", flush=True)
            time.sleep(args.pause)
        contender.check_alive()
        if digest(env.dest_url)[0] != 0:
            raise AssertionError("rows reached the destination before resume()")
        took, resumed, cpu = _timed(contender, env, args.timeout)
        done, unit = (count, "rows copied") if initial_load else (args.changes, "changes drained")
        print(
            f"debezium {mode}: {done} {unit} in {took:.2f} s = {done / took:,.0f}/s"
            f" (resume() returned in {resumed:.2f} s; JVM CPU {cpu:.1f} s)",
            flush=True,
        )
        if initial_load:
            # Then it follows changes.
            n = max(1, args.changes // 10)
            wrote = write_changes(env.source_url, n, seed=12)
            t = time.monotonic()
            seen = wait_equal(contender, env.source_url, env.dest_url, args.timeout)
            print(
                f"  then {n} changes written in {wrote:.1f} s: equal {seen - t:.2f} s after the last commit"
            )
        print(f"  rows equal (count and md5 of every row); processes {contender.processes()}", flush=True)
        ok = True
    finally:
        pid = contender.proc.pid if contender.proc else None
        contender.stop()
        contender.stop()  # idempotent
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)
                print(f"  JVM {pid} still alive after stop()!", flush=True)
                ok = False
        try:
            services.down()
        finally:
            if args.keep or not ok:
                print(f"  kept {home}", flush=True)
            else:
                shutil.rmtree(home, ignore_errors=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--changes", type=int, default=20_000)
    p.add_argument("--rows", type=int, default=20_000, help="rows before the initial load")
    p.add_argument("--batch-size", type=int, default=Debezium().batch_size)
    p.add_argument("--mode", choices=["stream", "initial-load", "both"], default="both")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--pause", type=float, default=0, help="seconds to wait between the changes and resume()")
    p.add_argument("--source-set", action="append", default=[], metavar="KEY=VALUE", help="source config")
    p.add_argument("--sink-set", action="append", default=[], metavar="KEY=VALUE", help="sink config")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, configs)")
    args = p.parse_args()
    modes = ["stream", "initial-load"] if args.mode == "both" else [args.mode]
    ok = True
    for mode in modes:
        ok = run(mode, args) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""``make bench``: this pipeline side by side with PostgreSQL logical replication, Debezium and a
naive consumer, on the same generated data, each scenario on fresh private services.

    python -m bench.run                     # everything, defaults below (about 30-40 minutes)
    python -m bench.run --smoke             # seconds-long run of every scenario, small numbers
    python -m bench.run --scenarios drain --contenders cdc,logical --changes 50000

Writes ``bench-results/report.md`` and ``bench-results/report.json``: the machine, every
figure, the ratios against each reference and the targets, and a py-spy profile summary of this
pipeline's daemons during the backlog drain. Exit status 1 if any run failed (the report says
which and why); the other runs still complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import bench_tables, harness, report, scenarios
from bench.contenders.logical import Logical
from bench.contenders.pipeline import Naive, Pipeline
from cdc.local.paths import PROJECT_DIR

ALL_CONTENDERS = ("cdc", "logical", "debezium", "naive")
ALL_SCENARIOS = ("drain", "tables", "latency", "load", "scaleout")


def make_contender(name: str, compare: Path | None = None):
    if name == "cdc":
        return Pipeline()
    if name == "cdc_base" and compare is not None:
        return Pipeline(tree=compare)
    if name == "logical":
        return Logical()
    if name == "naive":
        return Naive()
    if name == "debezium":
        from bench.contenders.debezium import Debezium

        return Debezium()
    raise SystemExit(f"bench: unknown contender {name!r} (one of {', '.join(ALL_CONTENDERS)})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    p.add_argument("--changes", type=int, default=200_000, help="backlog size for the drain (default 200000)")
    p.add_argument("--naive-changes", type=int, default=10_000, help="the naive consumer drains this prefix")
    p.add_argument("--rates", default="1000,5000", help="steady rates in changes/s (default 1000,5000)")
    p.add_argument(
        "--txn-sizes", default="1,10", help="statements per transaction for latency (default 1,10)"
    )
    p.add_argument("--latency-seconds", type=float, default=60.0)
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--load-rows", type=int, default=1_000_000, help="rows for the initial load (default 1M)")
    p.add_argument("--scaleout-changes", type=int, default=100_000, help="backlog for the scale-out runs")
    p.add_argument(
        "--tables-changes", type=int, default=150_000, help="changes per drain of the three-table scenario"
    )
    p.add_argument(
        "--tables-rounds", type=int, default=3, help="rounds of the three-table scenario (default 3)"
    )
    p.add_argument("--contenders", default=",".join(ALL_CONTENDERS))
    p.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="also run another checkout's producer.py and consumer_final.py as contender cdc_base "
        "(e.g. `git worktree add /tmp/base <commit>`), on the same data in the same run",
    )
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS))
    p.add_argument("--no-profile", action="store_true", help="skip py-spy during this pipeline's drain")
    p.add_argument("--smoke", action="store_true", help="tiny numbers: checks the harness in a minute or two")
    p.add_argument("--out", type=Path, default=PROJECT_DIR / "bench-results")
    args = p.parse_args(argv)
    if args.smoke:
        args.changes, args.naive_changes, args.load_rows, args.scaleout_changes = 3000, 300, 20_000, 2000
        args.tables_changes, args.tables_rounds = 3000, 1
        args.rates, args.txn_sizes, args.latency_seconds, args.idle_seconds = "200", "1", 6.0, 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    wanted = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if args.compare is not None and "cdc_base" not in names:
        names.insert(names.index("cdc") + 1 if "cdc" in names else 0, "cdc_base")
    contenders = {n: make_contender(n, args.compare) for n in names}
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": harness.describe_machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "drain": {},
        "latency": {},
        "load": {},
        "scaleout": [],
        "tables": {},
        "failures": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def attempt(label: str, fn, *a, **kw):
        print(f"bench: {label} ...", flush=True)
        t = time.monotonic()
        try:
            value = fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - one failed run must not hide the others
            line = f"{label}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            print(f"bench: FAILED {line}", flush=True)
            traceback.print_exc()
            results["failures"].append(line)
            return None
        print(f"bench: {label} done in {time.monotonic() - t:.0f} s: {report.one_line(value)}", flush=True)
        return value

    for name, contender in list(contenders.items()):
        if attempt(f"prepare {name}", lambda c=contender: c.prepare() or {}) is None:
            del contenders[name]

    if "drain" in wanted:
        base = harness.generate(args.changes)
        results["change_set"] = {
            "changes": base.changes,
            "transactions": len(base.transactions),
            **base.actions,
        }
        for name, contender in contenders.items():
            data = base.prefix(args.naive_changes) if name == "naive" else base
            profile = None if (args.no_profile or name != "cdc") else args.out / "profiles"
            r = attempt(
                f"drain {name} ({data.changes} changes)",
                scenarios.drain,
                contender,
                data,
                profile_dir=profile,
            )
            if r is not None:
                results["drain"][name] = r
            if name == "cdc":
                r = attempt("drain cdc producer alone / consumer alone", scenarios.drain_parts, base)
                if r is not None:
                    results["drain"]["cdc_producer_alone"] = r["producer"]
                    results["drain"]["cdc_consumer_alone"] = r["consumer"]

    if "tables" in wanted and "cdc" in contenders:
        r = attempt(
            f"tables: a mix of three tables against employees alone ({args.tables_changes} changes, "
            f"{args.tables_rounds} rounds)",
            bench_tables.measure,
            args.tables_changes,
            args.tables_rounds,
            log=lambda line: print(f"bench:   {line}", flush=True),
        )
        if r is not None:
            results["tables"] = r

    if "latency" in wanted:
        for name, contender in contenders.items():
            if name == "naive":
                continue  # it cannot keep up with these rates: its drain rate says so
            for per_txn in (int(x) for x in args.txn_sizes.split(",")):
                for rate in (float(x) for x in args.rates.split(",")):
                    r = attempt(
                        f"latency {name} {rate:.0f}/s, {per_txn} per transaction",
                        scenarios.latency,
                        contender,
                        rate=rate,
                        per_txn=per_txn,
                        seconds=args.latency_seconds,
                        idle_seconds=args.idle_seconds,
                    )
                    if r is not None:
                        results["latency"].setdefault(name, []).append(r)

    if "load" in wanted:
        for name, contender in contenders.items():
            if name == "naive":
                continue
            r = attempt(
                f"initial load {name} ({args.load_rows} rows)",
                scenarios.initial_load,
                contender,
                args.load_rows,
            )
            if r is not None:
                results["load"][name] = r

    if "scaleout" in wanted and "cdc" in contenders:
        data = harness.generate(args.scaleout_changes)
        r = attempt(
            f"scale-out: 1, 2, 3 consumers on a 3-broker cluster ({data.changes} changes)",
            scenarios.scaleout,
            data,
        )
        if r is not None:
            results["scaleout"] = r

    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["ratios"] = report.ratios(results)
    results["targets"] = report.targets(results)
    (args.out / "report.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (args.out / "report.md").write_text(report.markdown(results))
    print(f"bench: wrote {args.out / 'report.md'} and report.json", flush=True)
    if results["failures"]:
        print("bench: some runs failed:\n  " + "\n  ".join(results["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ratios, targets and the Markdown report of ``make bench`` (pure functions of the results)."""

from __future__ import annotations

from typing import Any

NAMES = {
    "cdc": "this pipeline (end to end)",
    "cdc_producer_alone": "this pipeline: producer alone",
    "cdc_consumer_alone": "this pipeline: consumer alone (pre-loaded topic)",
    "cdc_base": "this pipeline, the other checkout (--compare)",
    "logical": "PostgreSQL logical replication",
    "debezium": "Debezium (PostgreSQL source + JDBC sink, Kafka Connect standalone)",
    "naive": "naive per-message consumer (with this producer)",
}


TABLES_TARGET = 0.8  # issue 17: a mix of three tables drains at this share of employees alone


def one_line(value: Any) -> str:
    if not isinstance(value, dict):
        return ""
    if "changes_per_s" in value:
        return f"{value['changes_per_s']:,.0f} changes/s, identical={value.get('identical')}"
    if "p99_ms" in value:
        return f"p50 {value['p50_ms']} ms, p99 {value['p99_ms']} ms, missing {value['missing']}"
    if "rows_per_s" in value:
        return f"{value['rows_per_s']:,.0f} rows/s, identical={value.get('identical')}"
    if "ratio" in value and "medians" in value:
        return f"mix / employees only {value['ratio']:.3f}"
    if "producer" in value and "consumer" in value:
        return f"producer {value['producer']['changes_per_s']:,.0f}/s, consumer {value['consumer']['changes_per_s']:,.0f}/s"
    return ""


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    drain = {k: v.get("changes_per_s") for k, v in results.get("drain", {}).items()}
    load = {k: v.get("rows_per_s") for k, v in results.get("load", {}).items()}
    return {
        "drain_cdc_over_logical": _ratio(drain.get("cdc"), drain.get("logical")),
        "drain_cdc_base_over_logical": _ratio(drain.get("cdc_base"), drain.get("logical")),
        "drain_cdc_over_cdc_base": _ratio(drain.get("cdc"), drain.get("cdc_base")),
        "drain_cdc_over_debezium": _ratio(drain.get("cdc"), drain.get("debezium")),
        "drain_cdc_over_naive": _ratio(drain.get("cdc"), drain.get("naive")),
        "load_cdc_over_logical": _ratio(load.get("cdc"), load.get("logical")),
        "load_cdc_over_debezium": _ratio(load.get("cdc"), load.get("debezium")),
    }


def _latency(results: dict[str, Any], name: str, rate: float, per_txn: int = 1) -> dict[str, Any] | None:
    for r in results.get("latency", {}).get(name, []):
        if r["rate"] == rate and r["statements_per_txn"] == per_txn:
            return r
    return None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met (None: not run)."""
    r = ratios(results)
    out = []

    def add(what: str, value: Any, goal: str, met: bool | None) -> None:
        out.append({"target": what, "measured": value, "goal": goal, "met": met})

    for key, goal, floor in (
        ("drain_cdc_over_logical", ">= 0.25", 0.25),
        ("drain_cdc_over_debezium", ">= 3", 3.0),
        ("drain_cdc_over_naive", ">= 30", 30.0),
    ):
        add(
            f"backlog drain, {key.split('_over_')[1]} ratio",
            r[key],
            goal,
            None if r[key] is None else r[key] >= floor,
        )
    for rate, limit in ((1000.0, 50.0), (5000.0, 100.0)):
        lat = _latency(results, "cdc", rate)
        p99 = lat["p99_ms"] if lat else None
        ok = None if lat is None else (p99 <= limit and lat["missing"] == 0)
        add(f"p99 latency at {rate:.0f}/s (single-statement)", p99, f"<= {limit:.0f} ms", ok)
    lat = _latency(results, "cdc", 1000.0)
    cpu = lat["cpu_percent"].get("producer") if lat else None
    add("producer CPU at 1,000 changes/s", cpu, "<= 10 % of a core", None if cpu is None else cpu <= 10.0)
    peaks: dict[str, float] = {}
    for section in ("drain", "load"):
        for key, v in results.get(section, {}).items():
            if key.startswith("cdc"):
                for daemon, mib in v.get("peak_rss_mib", {}).items():
                    peaks[daemon] = max(peaks.get(daemon, 0.0), mib)
    for entries in results.get("latency", {}).get("cdc", []):
        for daemon, mib in entries.get("peak_rss_mib", {}).items():
            peaks[daemon] = max(peaks.get(daemon, 0.0), mib)
    for daemon in ("producer", "consumer"):
        value = peaks.get(daemon)
        add(f"{daemon} peak RSS", value, "<= 150 MiB", None if value is None else value <= 150.0)
    mix = results.get("tables", {}).get("ratio")
    add(
        "backlog drain, three tables over employees alone",
        mix,
        f">= {TABLES_TARGET}",
        None if mix is None else mix >= TABLES_TARGET,
    )
    return out


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.3g}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def _costs(v: dict[str, Any], key: str) -> str:
    return ", ".join(f"{k} {_fmt(x)}" for k, x in v.get(key, {}).items()) or "-"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# `make bench` report",
        "",
        f"Run {results['started']} to {results.get('finished', '?')}. Every contender ran on fresh private services "
        "on this machine, on the same generated data, in this one run.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in m.items()),
        "",
    ]
    cs = results.get("change_set")
    if cs:
        lines += [
            f"Change set: {cs['changes']:,} changes in {cs['transactions']:,} transactions "
            f"(INSERT {cs['INSERT']:,}, UPDATE {cs['UPDATE']:,}, DELETE {cs['DELETE']:,}), written to the source "
            "while every replicator was stopped. The naive consumer drains a prefix of it (its rate is the figure).",
            "",
        ]
    if results.get("failures"):
        lines += ["## Failed runs", "", *(f"- {f}" for f in results["failures"]), ""]

    lines += ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "not run"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['measured'])} | {t['goal']} | {met} |")
    lines.append("")

    drain = results.get("drain", {})
    if drain:
        lines += [
            "## Backlog drain",
            "",
            "From the start of the replicator until the destination equals the source (polled every 50 ms, "
            "then checked row by row); start-up: until the destination first changed; steady: the rate after "
            "that. CPU: the replicator's own processes; servers' CPU: each PostgreSQL "
            "server (all its backends) and the broker; machine CPU: every core, everything on the machine.",
            "",
            "| contender | changes | seconds | changes/s | start-up s | steady changes/s | identical "
            "| CPU s / 100k | servers' CPU s / 100k | machine CPU s / 100k | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, v in drain.items():
            lines.append(
                f"| {NAMES.get(key, key)} | {_fmt(v['changes'])} | {_fmt(v['seconds'])} | {_fmt(v['changes_per_s'])} "
                f"| {_fmt(v.get('startup_seconds'))} | {_fmt(v.get('steady_changes_per_s'))} | {v.get('identical', '-')} | {_costs(v, 'cpu_seconds_per_100k')} "
                f"| {_costs(v, 'service_cpu_seconds_per_100k')} | {_fmt(v.get('machine_cpu_seconds_per_100k'))} | {_costs(v, 'peak_rss_mib')} |"
            )
        if "events_summary" in drain.get("cdc", {}):
            lines += ["", f"This pipeline's event check after the drain: {drain['cdc']['events_summary']}"]
        lines.append("")
    r = results.get("ratios", {})
    if any(v is not None for v in r.values()):
        lines += ["## Ratios (this pipeline ÷ reference, same run)", ""]
        lines += [f"- {k.replace('_', ' ')}: {_fmt(v)}" for k, v in r.items() if v is not None]
        lines.append("")

    latency = results.get("latency", {})
    if latency:
        lines += [
            "## Steady latency",
            "",
            "Source COMMIT returned → destination transaction committing the row (a deferred trigger on the "
            "destination stamps clock_timestamp() at commit). Every change inserts a new row; the first 5 s are "
            "warm-up. CPU % is of one core during the load window; idle CPU is the 10 s before it.",
            "",
            "| contender | rate/s | stmts/txn | achieved/s | p50 ms | p95 ms | p99 ms | max ms | missing | CPU % | idle CPU % |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, runs in latency.items():
            for v in runs:
                lines.append(
                    f"| {NAMES.get(key, key)} | {_fmt(v['rate'])} | {v['statements_per_txn']} | {_fmt(v['achieved_rate'])} "
                    f"| {_fmt(v['p50_ms'])} | {_fmt(v['p95_ms'])} | {_fmt(v['p99_ms'])} | {_fmt(v['max_ms'])} "
                    f"| {v['missing']} | {_costs(v, 'cpu_percent')} | {_costs(v, 'idle_cpu_percent')} |"
                )
        lines.append("")
        staged = [(v, v["stages"]) for v in latency.get("cdc", []) if v.get("stages")]
        if staged:
            lines += [
                "This pipeline's own histograms over the same windows (warm-up included; interpolated within "
                "buckets of 25, 50, 100, 250 ms ..., so coarse): where a tail comes from, the producer side "
                "(source capture → broker acknowledgement) or the whole path (→ destination commit).",
                "",
                "| rate/s | stmts/txn | capture→ack p50 / p99 ms | capture→dest commit p50 / p99 ms |",
                "|---|---|---|---|",
            ]
            for v, st in staged:
                lines.append(
                    f"| {_fmt(v['rate'])} | {v['statements_per_txn']} "
                    f"| {_fmt(st.get('capture_to_ack_p50_ms'))} / {_fmt(st.get('capture_to_ack_p99_ms'))} "
                    f"| {_fmt(st.get('end_to_end_p50_ms'))} / {_fmt(st.get('end_to_end_p99_ms'))} |"
                )
            lines.append("")

    tables = results.get("tables", {})
    if tables:
        lines += [
            "## Three tables against employees alone",
            "",
            f"The same number of changes ({_fmt(tables['changes'])}) drained as employees INSERTs alone, and as a "
            "mix of a third each into employees and two generic tables (`orders`, one-column key; `lines`, "
            "composite key), rounds alternating which goes first; the daemons start on the written backlog "
            "and the clock stops when the destination has decided every change. Median of the rounds.",
            "",
            "| run | changes/s (median) | rounds | CPU s / 100k (first round) |",
            "|---|---|---|---|",
        ]
        for name, median in tables["medians"].items():
            rounds = ", ".join(_fmt(x) for x in tables["rounds"][name])
            cpu = tables["cpu_seconds_per_100k"][name]
            first = ", ".join(f"{k} {_fmt(x)}" for k, x in cpu[0].items()) if cpu else "-"
            lines.append(f"| {name} | {_fmt(median)} | {rounds} | {first} |")
        lines += ["", f"Ratio mix / employees only: {_fmt(tables['ratio'])}.", ""]

    load = results.get("load", {})
    if load:
        lines += [
            "## Initial load",
            "",
            "An existing table copied into an empty destination: this pipeline's `producer.py --snapshot`, "
            "logical replication's `copy_data`, Debezium's initial snapshot.",
            "",
            "| contender | rows | seconds | rows/s | identical | CPU s | peak RSS MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, v in load.items():
            lines.append(
                f"| {NAMES.get(key, key)} | {_fmt(v['rows'])} | {_fmt(v['seconds'])} | {_fmt(v['rows_per_s'])} "
                f"| {v.get('identical')} | {_costs(v, 'cpu_seconds')} | {_costs(v, 'peak_rss_mib')} |"
            )
        lines.append("")

    scale = results.get("scaleout", [])
    if scale:
        lines += [
            "## Consumer scale-out (3-broker cluster, replication factor 3)",
            "",
            "Each row: that many consumers in a new group on a new topic (6 partitions) wait, assigned; the clock "
            "starts as the producer publishes the backlog (it alone is about twice as fast as one consumer) and "
            "stops when the emptied destination equals the source.",
            "",
            "| consumers | changes | seconds | changes/s | steady changes/s | identical | daemons' CPU s / 100k "
            "| servers' CPU s / 100k | machine CPU s / 100k |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for v in scale:
            lines.append(
                f"| {v['consumers']} | {_fmt(v['changes'])} | {_fmt(v['seconds'])} | {_fmt(v['changes_per_s'])} "
                f"| {_fmt(v.get('steady_changes_per_s'))} | {v.get('identical')} | {_costs(v, 'cpu_seconds_per_100k')} "
                f"| {_costs(v, 'service_cpu_seconds_per_100k')} | {_fmt(v.get('machine_cpu_seconds_per_100k'))} |"
            )
        lines += ["", scale_note(scale), ""]

    profile = drain.get("cdc", {}).get("profile")
    if profile:
        lines += [
            "## Where this pipeline's time goes (py-spy, backlog drain)",
            "",
            "Share of samples with the function on the stack (inclusive) and on top (self), per daemon.",
            "",
        ]
        for daemon, p in profile.items():
            if "error" in p:
                lines += [f"- {daemon}: {p['error']}"]
                continue
            lines += [
                f"### {daemon} ({p['samples']:,} samples)",
                "",
                "| inclusive | % | self | % |",
                "|---|---|---|---|",
            ]
            for (fi, pi), (fs, ps) in zip(p["inclusive"], p["self"], strict=False):
                lines.append(f"| `{fi}` | {pi} | `{fs}` | {ps} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def scale_note(scale: list[dict[str, Any]]) -> str:
    """What limits scaling, read from the figures: the machine's cores, or something else."""
    one = next((v for v in scale if v["consumers"] == 1), None)
    best = max(scale, key=lambda v: v["changes_per_s"])
    if not one:
        return ""
    machine_s = one.get("machine_cpu_seconds", 0.0)
    busy = machine_s / one["seconds"] if one.get("seconds") else 0.0
    return (
        f"With one consumer the machine was {busy:.1f} of {_cores()} cores busy; the best rate was with "
        f"{best['consumers']} consumer(s), {best['changes_per_s'] / one['changes_per_s']:.2f}x one consumer. "
        "Every consumer, the three brokers and the destination server share the same cores, so more "
        "consumers only help while cores are idle: on two cores the destination's CPU and the consumers' "
        "own CPU per change bound the sum, not the partition count."
    )


def _cores() -> int:
    import os

    return os.cpu_count() or 1

"""The scenarios of ``make bench``: backlog drain, steady latency, initial load. Each run gets
fresh private services; every contender sees the same generated data."""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg2
from confluent_kafka import Consumer, KafkaException, TopicPartition
from psycopg2 import sql

from bench import harness, tables
from bench.contenders.base import BenchEnv
from bench.contenders.pipeline import Pipeline
from cdc.ops.verify import check_events
from cdc.runtime.settings import load_settings

DRAIN_TIMEOUT = 1800.0
TABLE = tables.TABLE


def _rate(changes: int, seconds: float) -> float:
    return round(changes / seconds, 1) if seconds > 0 else 0.0


def _cost(meter: harness.CostMeter, changes: int) -> dict[str, Any]:
    per = 100_000 / changes if changes else 0
    return {
        "cpu_seconds": {k: round(v, 2) for k, v in meter.cpu.items()},
        "cpu_seconds_per_100k": {k: round(v * per, 2) for k, v in meter.cpu.items()},
        "peak_rss_mib": {k: round(v, 1) for k, v in meter.rss.items()},
        "service_cpu_seconds_per_100k": {k: round(v * per, 2) for k, v in meter.service_cpu.items()},
        "machine_cpu_seconds": round(meter.machine, 2),
        "machine_cpu_seconds_per_100k": round(meter.machine * per, 2),
    }


def _steady(changes: int, started: float, arrival: harness.Arrival) -> dict[str, float]:
    """Start-up (until the destination first changed) and the rate from then on."""
    return {
        "startup_seconds": round(arrival.first - started, 3),
        "steady_changes_per_s": _rate(changes, arrival.done - arrival.first),
    }


def _alive(contender) -> Callable[[], None]:
    return getattr(contender, "check_alive", lambda: None)


def _pipeline_checks(contender, env: BenchEnv) -> dict[str, Any]:
    """For this project's pipeline: every action_id of the outbox decided exactly once."""
    if not isinstance(contender, Pipeline) or contender.name != "cdc":
        return {}
    report = check_events(load_settings(env=env.env, dotenv_path=None))
    return {"events_ok": report.ok, "events_summary": "; ".join(ln for ln in report.lines() if ln)}


# -- backlog drain -----------------------------------------------------------------------------


def drain(contender, changes: harness.ChangeSet, *, profile_dir: Path | None = None) -> dict[str, Any]:
    """The change set written while the contender is stopped; then time until identical."""
    with harness.scenario("drain", outbox=contender.needs_outbox) as (env, services):
        contender.setup(env, initial_load=False)
        try:
            write_s = harness.write_changes(env.source_url, changes)
            target = harness.fingerprint(env.source_url)
            meter = harness.CostMeter(contender.processes, harness.service_pids(services))
            meter.start()
            started = time.monotonic()
            contender.resume()
            profilers = _profile(contender, profile_dir) if profile_dir else []
            arrival = harness.wait_equal(env.dest_url, target, timeout=DRAIN_TIMEOUT, alive=_alive(contender))
            meter.stop()
            seconds = arrival.done - started
            result = {
                "changes": changes.changes,
                "source_write_seconds": round(write_s, 2),
                "seconds": round(seconds, 3),
                "changes_per_s": _rate(changes.changes, seconds),
                **_steady(changes.changes, started, arrival),
                "identical": harness.rows_identical(env.source_url, env.dest_url),
                "rows": target[0],
                **_cost(meter, changes.changes),
                **_pipeline_checks(contender, env),
            }
        finally:
            contender.stop()
        if profile_dir:
            result["profile"] = _profile_summary(profilers)
        return result


def drain_parts(changes: harness.ChangeSet, settings: dict[str, str] | None = None) -> dict[str, Any]:
    """This pipeline's two halves alone: the producer publishing the backlog (until the topic
    holds every change), then the consumer applying the pre-loaded topic (until identical)."""
    contender = Pipeline(settings=settings)
    with harness.scenario("parts", outbox=True) as (env, services):
        contender.setup(env, initial_load=False)
        try:
            harness.write_changes(env.source_url, changes)
            target = harness.fingerprint(env.source_url)
            meter = harness.CostMeter(contender.processes, harness.service_pids(services))
            meter.start()
            started = time.monotonic()
            contender.resume(("producer",))
            done = _wait_topic(env.bootstrap, contender.topic, changes.changes, _alive(contender))
            meter.stop()
            producer = {
                "changes": changes.changes,
                "seconds": round(done - started, 3),
                "changes_per_s": _rate(changes.changes, done - started),
                **_cost(meter, changes.changes),
            }
            contender.stop_part("producer")
            meter = harness.CostMeter(contender.processes, harness.service_pids(services))
            meter.start()
            started = time.monotonic()
            contender.resume(("consumer",))
            arrival = harness.wait_equal(env.dest_url, target, timeout=DRAIN_TIMEOUT, alive=_alive(contender))
            meter.stop()
            consumer = {
                "changes": changes.changes,
                "seconds": round(arrival.done - started, 3),
                "changes_per_s": _rate(changes.changes, arrival.done - started),
                **_steady(changes.changes, started, arrival),
                "identical": harness.rows_identical(env.source_url, env.dest_url),
                **_cost(meter, changes.changes),
                **_pipeline_checks(contender, env),
            }
        finally:
            contender.stop()
    return {"producer": producer, "consumer": consumer}


def scaleout(changes: harness.ChangeSet, counts: tuple[int, ...] = (1, 2, 3)) -> list[dict[str, Any]]:
    """Apply throughput of 1, 2, 3 consumers in one group on a 3-broker cluster (replication
    factor 3). For each count: a new topic and group; the consumers start first and the clock
    starts once the group is stable with every partition assigned; then the producer publishes
    the backlog from the beginning (it alone is about twice as fast as one consumer), until the
    emptied destination equals the source."""
    contender = Pipeline()
    results = []
    with harness.scenario("scaleout", outbox=True, brokers=3) as (env, services):
        contender.setup(env, initial_load=False)
        try:
            harness.write_changes(env.source_url, changes)
            target = harness.fingerprint(env.source_url)
            for count in counts:
                _exec(env.dest_url, "TRUNCATE employees, processed_events, emp_versions")
                _exec(
                    env.source_url,
                    "UPDATE cdc_producer_state SET last_txid = '0', last_action_id = 0, published_total = 0",
                )
                contender.new_topic()
                for k in range(count):
                    contender.start("consumer" if k == 0 else f"consumer-{k + 1}")
                _wait_group(env.bootstrap, contender.group(), count, _alive(contender))
                meter = harness.CostMeter(contender.processes, harness.service_pids(services))
                meter.start()
                started = time.monotonic()
                contender.start("producer")
                arrival = harness.wait_equal(
                    env.dest_url, target, timeout=DRAIN_TIMEOUT, alive=_alive(contender)
                )
                meter.stop()
                results.append(
                    {
                        "consumers": count,
                        "changes": changes.changes,
                        "seconds": round(arrival.done - started, 3),
                        "changes_per_s": _rate(changes.changes, arrival.done - started),
                        **_steady(changes.changes, started, arrival),
                        "identical": harness.rows_identical(env.source_url, env.dest_url),
                        **_cost(meter, changes.changes),
                    }
                )
                for part in list(contender.procs):
                    contender.stop_part(part)
        finally:
            contender.stop()
    return results


def _wait_group(
    bootstrap: str, group: str, members: int, alive: Callable[[], None], timeout: float = 120
) -> None:
    """Until ``group`` is stable with ``members`` members and every partition assigned."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        try:
            desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
            assigned = sum(len(m.assignment.topic_partitions) for m in desc.members)
            if desc.state == ConsumerGroupState.STABLE and len(desc.members) == members and assigned >= 6:
                return
        except KafkaException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"consumer group {group} not stable with {members} members after {timeout:.0f} s")


def _wait_topic(bootstrap: str, topic: str, count: int, alive: Callable[[], None]) -> float:
    """Poll the topic's high watermarks until they add up to ``count``; monotonic time seen."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "bench-watch", "enable.auto.commit": False}
    )
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        partitions: list[int] = []
        while True:
            if not partitions:
                meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
                partitions = sorted(meta.partitions) if meta and not meta.error else []
            try:
                total = sum(
                    consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1] for p in partitions
                )
            except KafkaException:
                total = 0  # a partition without a leader yet, just after the topic was created
            now = time.monotonic()
            if partitions and total >= count:
                return now
            if now > deadline:
                raise TimeoutError(
                    f"topic {topic} holds {total} of {count} messages after {DRAIN_TIMEOUT:.0f} s"
                )
            alive()
            time.sleep(0.05)
    finally:
        consumer.close()


# -- steady latency ----------------------------------------------------------------------------

# When each key's row arrived on the destination.
SEEN_SQL = sql.SQL("""
CREATE UNLOGGED TABLE bench_seen ({k} {type} NOT NULL, seen_at timestamptz NOT NULL);
CREATE FUNCTION bench_seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.bench_seen VALUES (NEW.{k}, clock_timestamp());
    RETURN NULL;
END $$;
-- Deferred: fires as the writing transaction commits, whoever writes (replication included).
CREATE CONSTRAINT TRIGGER bench_seen AFTER INSERT OR UPDATE ON {t}
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bench_seen();
ALTER TABLE {t} ENABLE ALWAYS TRIGGER bench_seen;
""").format(k=TABLE.key.ident, type=sql.SQL(TABLE.key.type), t=TABLE.ident)
SEEN = sql.SQL("SELECT {k}, min(extract(epoch FROM seen_at))::float8 FROM bench_seen GROUP BY {k}").format(
    k=TABLE.key.ident
)

LATENCY_ID_BASE = 10_000_000


def _exec(url: str, statement: str | sql.Composable, params: tuple = ()) -> list[tuple]:
    with contextlib.closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []


def _seen(url: str) -> dict[int, float]:
    return dict(_exec(url, SEEN))


def _drive(url: str, rate: float, per_txn: int, seconds: float) -> list[tuple[int, float]]:
    """Commit ``rate`` new rows per second in transactions of ``per_txn`` rows for ``seconds``.

    Returns (key, wall-clock time the COMMIT returned) for each row. Several writer threads
    share the rate, each on its own schedule, so one slow commit does not stall the others.
    """
    txn_rate = rate / per_txn
    threads = max(1, math.ceil(txn_rate / 400))
    out: list[list[tuple[int, float]]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start = time.monotonic() + 0.2

    def writer(k: int) -> None:
        try:
            with contextlib.closing(psycopg2.connect(url)) as conn:
                conn.autocommit = True
                cur = conn.cursor()
                # One statement text per transaction: a row's values, per_txn times.
                insert = sql.SQL("INSERT INTO {t} ({c}) VALUES ({p})").format(
                    t=TABLE.ident,
                    c=tables.names((TABLE.key, *TABLE.values)),
                    p=sql.SQL(", ").join([sql.Placeholder()] * (1 + len(TABLE.values))),
                )
                text = insert.as_string(cur)
                if per_txn > 1:
                    text = "BEGIN;" + ";".join([text] * per_txn) + ";COMMIT"
                per_thread = txn_rate / threads
                i = 0
                base = LATENCY_ID_BASE + k * 10_000_000
                while True:
                    due = start + i / per_thread
                    if due - start >= seconds:
                        break
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    ids = [base + i * per_txn + j for j in range(per_txn)]
                    cur.execute(text, [v for e in ids for v in tables.fixed_row(TABLE, e)])
                    now = time.time()
                    out[k].extend((e, now) for e in ids)
                    i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError(f"latency writer failed: {errors[0]}")
    return [c for part in out for c in part]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def latency(
    contender, *, rate: float, per_txn: int, seconds: float, warmup: float = 5.0, idle_seconds: float = 10.0
) -> dict[str, Any]:
    """Source commit -> destination commit at a steady rate; the daemons' CPU idle and under it."""
    with harness.scenario("latency", outbox=contender.needs_outbox) as (env, _services):
        _exec(env.dest_url, SEEN_SQL)
        contender.setup(env, initial_load=False)
        try:
            contender.resume()
            # Ready when a first row has gone through (group joined, slots streaming).
            _exec(
                env.source_url,
                sql.SQL("INSERT INTO {t} ({k}) VALUES (0)").format(t=TABLE.ident, k=TABLE.key.ident),
            )
            harness.wait_equal(
                env.dest_url, harness.fingerprint(env.source_url), timeout=300, alive=_alive(contender)
            )
            idle = harness.CostMeter(contender.processes)
            idle.start()
            time.sleep(idle_seconds)
            idle.stop()
            meter = harness.CostMeter(contender.processes)
            meter.start()
            scrape = getattr(contender, "scrape_stages", None)
            before = scrape() if scrape else None
            t0 = time.monotonic()
            commits = _drive(env.source_url, rate, per_txn, seconds)
            window = time.monotonic() - t0
            meter.stop()
            deadline = time.monotonic() + 300
            while len(seen := _seen(env.dest_url)) < len(commits) + 1 and time.monotonic() < deadline:
                _alive(contender)()
                time.sleep(0.5)
            stages = contender.stages(before, scrape()) if scrape else {}
        finally:
            contender.stop()
    first = min(t for _, t in commits)
    lat = sorted((seen[e] - t) * 1000 for e, t in commits if e in seen and t - first >= warmup)
    missing = sum(1 for e, _ in commits if e not in seen)
    return {
        "rate": rate,
        "statements_per_txn": per_txn,
        "seconds": seconds,
        "achieved_rate": round(len(commits) / window, 1),
        "changes": len(commits),
        "measured": len(lat),
        "missing": missing,
        "p50_ms": round(_percentile(lat, 0.50), 1),
        "p95_ms": round(_percentile(lat, 0.95), 1),
        "p99_ms": round(_percentile(lat, 0.99), 1),
        "max_ms": round(lat[-1], 1) if lat else None,
        "cpu_percent": {k: round(100 * v / window, 1) for k, v in meter.cpu.items()},
        "idle_cpu_percent": {k: round(100 * v / idle_seconds, 2) for k, v in idle.cpu.items()},
        "peak_rss_mib": {k: round(v, 1) for k, v in meter.rss.items()},
        **({"stages": stages} if stages else {}),
    }


# -- initial load ------------------------------------------------------------------------------


def initial_load(contender, rows: int) -> dict[str, Any]:
    """An existing ``rows``-row table copied into an empty destination (each one's snapshot)."""
    with harness.scenario("load", outbox=False) as (env, services):
        harness.load_rows(env.source_url, rows)
        if contender.needs_outbox:
            services.source.apply_sql(harness.SETUP_SOURCE_SQL)
            services.dest.apply_sql(harness.SETUP_DEST_SQL)
        target = harness.fingerprint(env.source_url)
        contender.setup(env, initial_load=True)
        try:
            meter = harness.CostMeter(contender.processes, harness.service_pids(services))
            meter.start()
            started = time.monotonic()
            contender.resume()
            arrival = harness.wait_equal(
                env.dest_url, target, timeout=DRAIN_TIMEOUT, interval=0.5, alive=_alive(contender)
            )
            meter.stop()
            seconds = arrival.done - started
            return {
                "rows": rows,
                "seconds": round(seconds, 2),
                "rows_per_s": _rate(rows, seconds),
                "identical": harness.rows_identical(env.source_url, env.dest_url),
                **_cost(meter, rows),
            }
        finally:
            contender.stop()


# -- profile -----------------------------------------------------------------------------------


def _profile(contender, out: Path) -> list[tuple[str, Path, subprocess.Popen[bytes]]]:
    """py-spy on each daemon of the contender, until it exits (raw collapsed stacks)."""
    spy = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    if not Path(spy).exists():
        return []
    out.mkdir(parents=True, exist_ok=True)
    started = []
    for name, pid in contender.processes().items():
        path = out / f"{contender.name}-{name}.txt"
        proc = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(path),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append((name, path, proc))
    return started


def _profile_summary(
    profilers: list[tuple[str, Path, subprocess.Popen[bytes]]], top: int = 12
) -> dict[str, Any]:
    """Per daemon: the functions with the most samples on the stack (inclusive) and on top (self)."""
    summary: dict[str, Any] = {}
    for name, path, proc in profilers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if not path.exists():
            summary[name] = {"error": "py-spy wrote no profile"}
            continue
        inclusive: dict[str, int] = {}
        own: dict[str, int] = {}
        total = 0
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [
                f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                if " (" in f
                else f
                for f in stack.split(";")
            ]
            for f in set(frames):
                inclusive[f] = inclusive.get(f, 0) + n
            own[frames[-1]] = own.get(frames[-1], 0) + n
        summary[name] = {
            "samples": total,
            "inclusive": _top(inclusive, total, top),
            "self": _top(own, total, top),
        }
    return summary


def _top(counts: dict[str, int], total: int, top: int) -> list[tuple[str, float]]:
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return [(k, round(100 * v / total, 1)) for k, v in ranked]

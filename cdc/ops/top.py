"""``python -m cdc top``: a live terminal view of both daemons, read from their metrics endpoints.

Every refresh:
1. Scrape each daemon's ``/metrics`` (Prometheus text), ``/ready`` and ``/live``, in parallel; a
   daemon that does not answer becomes one line ("down: connection refused"), never a traceback.
2. Compare with the previous scrape of the same daemon: counters become rates, histogram buckets
   become the p50/p99 of the events observed in between (interpolated inside a bucket, as
   Prometheus' ``histogram_quantile`` does). On the first screen, or after a restart, or when
   nothing was observed in between, both fall back to "since the process started".
3. Render plain text: redrawn in place (ANSI) on a terminal, appended otherwise.

Only the standard library and ``prometheus_client.parser``: no curses, works over any ssh.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from cdc.runtime.settings import Settings

DEFAULT_INTERVAL = 2.0  # seconds between screens
FETCH_TIMEOUT = 2.0  # per request; a daemon slower than this is shown as not answering
QUANTILES = (0.5, 0.99)

# ANSI: cursor home, erase to the end of the line, erase below the cursor.
HOME, ERASE_LINE, ERASE_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"

Labels = Mapping[str, str]


class Metrics:
    """One scrape's samples, by sample name (``cdc_x_total``, ``cdc_y_seconds_bucket``, ...)."""

    def __init__(self, samples: Mapping[str, list[tuple[dict[str, str], float]]]) -> None:
        self.samples = samples

    @classmethod
    def parse(cls, text: str) -> Metrics:
        """Parse Prometheus text exposition; ValueError when it is not that."""
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            # A declared family without samples yet (a labelled counter before its first
            # increment) reads as 0, not as "not served".
            samples.setdefault(f"{family.name}_total" if family.type == "counter" else family.name, [])
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return cls(samples)

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of ``name`` whose labels include ``labels``."""
        return [
            (have, value)
            for have, value in self.samples.get(name, [])
            if all(have.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the matching samples (0 when none match); None when ``name`` is not served."""
        if name not in self.samples:
            return None
        return sum(v for _, v in self.series(name, **labels))

    def label(self, name: str, key: str) -> str | None:
        """A label's value on the first sample of ``name`` (e.g. the version of build info)."""
        found = self.samples.get(name)
        return found[0][0].get(key) if found else None

    def buckets(self, histogram: str, **labels: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a histogram, by bound, summed over other labels."""
        by_bound: dict[float, float] = {}
        for have, value in self.series(f"{histogram}_bucket", **labels):
            bound = float(have["le"])
            by_bound[bound] = by_bound.get(bound, 0.0) + value
        return sorted(by_bound.items())


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative histogram ``buckets`` (sorted, the last one +Inf).

    Within the bucket holding the rank, observations are taken as spread evenly between its lower
    and upper bound (the first bucket starts at 0). A rank in the +Inf bucket gives the highest
    finite bound, the most that can be said. None when the histogram is empty.
    """
    if not buckets or not math.isinf(buckets[-1][0]):
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            if bound <= 0:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def bucket_delta(
    now: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]
) -> list[tuple[float, float]] | None:
    """Buckets of the observations made between two scrapes; None if they do not line up or went
    down (the process restarted)."""
    if [b for b, _ in now] != [b for b, _ in before]:
        return None
    delta = [(bound, c1 - c0) for (bound, c1), (_, c0) in zip(now, before, strict=True)]
    return None if any(c < 0 for _, c in delta) else delta


@dataclass
class Scrape:
    """What one daemon answered at one moment."""

    url: str
    at: float  # time.monotonic() of the scrape
    metrics: Metrics | None = None
    error: str | None = None  # why there are no metrics: "down: connection refused", ...
    ready: bool | None = None
    ready_reason: str = ""
    live: bool | None = None
    live_reason: str = ""

    @property
    def reachable(self) -> bool:
        return self.metrics is not None


def _why(exc: BaseException, timeout: float) -> str:
    """A short reason for a failed request, without the URL (shown beside it anyway)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """Status and body; an HTTP error status is an answer too (503 from /ready means not ready)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _probe(url: str, path: str, key: str, timeout: float) -> tuple[bool | None, str]:
    """(ok, reason) from a JSON probe endpoint (/ready, /live); None when it is not served."""
    try:
        status, body = _get(url + path, timeout)
        answer = json.loads(body)
    except (OSError, ValueError):
        return None, ""
    if status == 404 or not isinstance(answer, dict) or key not in answer:
        return None, ""
    return bool(answer[key]), str(answer.get("reason") or "")


def fetch(url: str, timeout: float = FETCH_TIMEOUT) -> Scrape:
    """Scrape one daemon: /metrics, then /ready and /live. Never raises for a daemon's state."""
    url = url.rstrip("/")
    scrape = Scrape(url=url, at=time.monotonic())
    try:
        status, body = _get(url + "/metrics", timeout)
    except (OSError, ValueError) as exc:
        scrape.error = f"down: {_why(exc, timeout)}"
        return scrape
    if status != 200:
        scrape.error = f"no metrics: /metrics answered HTTP {status}"
        return scrape
    try:
        scrape.metrics = Metrics.parse(body.decode("utf-8", errors="replace"))
    except (ValueError, IndexError) as exc:  # what the parser raises on text it does not know
        scrape.error = f"unreadable: /metrics is not Prometheus text ({exc})"
        return scrape
    scrape.ready, scrape.ready_reason = _probe(url, "/ready", "ready", timeout)
    if scrape.ready is None:
        gauge = scrape.metrics.value("cdc_ready")
        scrape.ready = None if gauge is None else gauge >= 1
    scrape.live, scrape.live_reason = _probe(url, "/live", "live", timeout)
    return scrape


class Window:
    """The newest scrape of a daemon and what changed since the one before.

    Rates and percentiles are over the time between the two scrapes; without a usable earlier
    scrape (the first screen, or the process restarted) they are since the process started.
    """

    def __init__(self, now: Scrape, before: Scrape | None, wall: float | None = None) -> None:
        assert now.metrics is not None
        self.m = now.metrics
        self.wall = time.time() if wall is None else wall
        started = self.m.value("process_start_time_seconds")
        self.uptime = self.wall - started if started else None
        self.before: Metrics | None = None
        self.seconds = 0.0
        if before is not None and before.metrics is not None and now.at > before.at:
            same_process = before.metrics.value("process_start_time_seconds") == started
            if same_process:
                self.before, self.seconds = before.metrics, now.at - before.at

    def value(self, name: str, **labels: str) -> float | None:
        return self.m.value(name, **labels)

    def rate(self, name: str, **labels: str) -> float | None:
        """Per second, over the window; since start without an earlier scrape."""
        now = self.m.value(name, **labels)
        if now is None:
            return None
        if self.before is not None:
            before = self.before.value(name, **labels) or 0.0
            if now >= before:
                return (now - before) / self.seconds
        return now / self.uptime if self.uptime else None

    def change(self, name: str, **labels: str) -> float | None:
        """Per-second change of a gauge over the window (lag growing or shrinking)."""
        now = self.m.value(name, **labels)
        if now is None or self.before is None:
            return None
        return (now - (self.before.value(name, **labels) or 0.0)) / self.seconds

    def quantiles(self, histogram: str, **labels: str) -> tuple[list[float | None], bool]:
        """p50 and p99 of ``histogram``, and whether they are over the window (False: since start)."""
        now = self.m.buckets(histogram, **labels)
        if self.before is not None:
            delta = bucket_delta(now, self.before.buckets(histogram, **labels))
            if delta and delta[-1][1] > 0:
                return [quantile(q, delta) for q in QUANTILES], True
        return [quantile(q, now) for q in QUANTILES], False


# --- formatting ---------------------------------------------------------------------------------


def count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def per_second(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-/s"
    sign = "+" if signed else ""
    return f"{value:{sign},.0f}/s" if abs(value) >= 10 else f"{value:{sign}.1f}/s"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def percentiles(w: Window, histogram: str) -> str:
    (p50, p99), recent = w.quantiles(histogram)
    if p50 is None:
        return "no events yet"
    return f"p50 {duration(p50)}   p99 {duration(p99)}" + ("" if recent else "   (since start)")


def _process(w: Window) -> str:
    parts = []
    version = w.m.label("cdc_build_info", "version")
    if version:
        parts.append(f"v{version}")
    if w.uptime is not None:
        parts.append(f"up {duration(w.uptime)}")
    cpu = w.rate("process_cpu_seconds_total")
    if cpu is not None:
        parts.append(f"cpu {cpu * 100:.0f}%")
    rss = w.value("process_resident_memory_bytes")
    if rss is not None:
        parts.append(f"rss {rss / 2**20:.0f} MiB")
    if w.before is None:
        parts.append("(rates since start)")
    return "   ".join(parts)


def _one_line(text: str) -> str:
    return " ".join(text.split())  # a reason quoting a multi-line error stays on its line


def _state(scrape: Scrape) -> str:
    if scrape.ready is None:
        state = "readiness unknown"
    elif scrape.ready:
        state = "ready"
    else:
        state = "NOT READY" + (f": {_one_line(scrape.ready_reason)}" if scrape.ready_reason else "")
    if scrape.live is False:
        state += "   STUCK" + (f": {_one_line(scrape.live_reason)}" if scrape.live_reason else "")
    return state


def _age(seconds: float | None) -> str:
    return "none" if seconds == 0 else duration(seconds)


def producer_lines(w: Window, scrape: Scrape) -> list[str]:
    active = w.value("cdc_producer_active")
    role = "-" if active is None else "active" if active >= 1 else "standby"
    held = w.value("cdc_producer_held_back_rows")
    held_for = w.value("cdc_producer_held_back_seconds")
    return [
        f"  {role}   {_state(scrape)}",
        f"  published     {count(w.value('cdc_producer_events_published_total')):>12}"
        f"  {per_second(w.rate('cdc_producer_events_published_total')):>10}"
        f"   batches {count(w.value('cdc_producer_batches_total'))}",
        f"  outbox        backlog {count(w.value('cdc_producer_outbox_backlog_rows'))} rows"
        f"   held back {count(held)} rows"
        + (f" for {duration(held_for)}" if held and held_for else "")
        + f"   oldest open transaction {_age(w.value('cdc_producer_oldest_transaction_age_seconds'))}",
        f"  capture->ack  {percentiles(w, 'cdc_producer_capture_to_ack_seconds')}",
        f"  errors        delivery {count(w.value('cdc_producer_delivery_errors_total'))}"
        f"   retries {count(w.value('cdc_producer_retries_total'))}"
        f"   invalid rows {count(w.value('cdc_producer_invalid_rows_total'))}",
    ]


def _partitions(lags: Iterable[tuple[dict[str, str], float]], width: int) -> list[str]:
    """``p:lag`` items, partition order, wrapped to ``width``."""
    items = sorted(lags, key=lambda it: (it[0].get("topic", ""), int(it[0].get("partition", "0") or 0)))
    cells = [f"{labels.get('partition', '?')}:{value:,.0f}" for labels, value in items]
    lines, line = [], ""
    for cell in cells:
        if line and len(line) + 2 + len(cell) > width:
            lines.append(line)
            line = ""
        line = f"{line}  {cell}" if line else cell
    return [*lines, line] if line else lines


def _kinds(w: Window) -> str:
    """`` (database 3, kafka 1)``: the transient errors by kind, when there were any."""
    kinds = [
        (labels.get("kind", "?"), v) for labels, v in w.m.series("cdc_consumer_transient_errors_total") if v
    ]
    return " (" + ", ".join(f"{kind} {v:,.0f}" for kind, v in sorted(kinds)) + ")" if kinds else ""


def consumer_lines(w: Window, scrape: Scrape, width: int = 100) -> list[str]:
    lags = w.m.series("cdc_consumer_lag_messages")
    lag_total = sum(v for _, v in lags) if lags else None
    trend = w.change("cdc_consumer_lag_messages")
    paused = w.value("cdc_consumer_paused")
    in_use = w.value("cdc_consumer_db_connections_in_use")
    pool_max = w.value("cdc_consumer_db_connections_max")
    outcome = "cdc_consumer_events_total"
    lines = [
        f"  {count(w.value('cdc_consumer_assigned_partitions'))} partitions assigned   {_state(scrape)}",
        f"  consumed      {count(w.value('cdc_consumer_messages_consumed_total')):>12}"
        f"  {per_second(w.rate('cdc_consumer_messages_consumed_total')):>10}",
        f"  applied       {count(w.value(outcome, outcome='applied')):>12}"
        f"  {per_second(w.rate(outcome, outcome='applied')):>10}"
        f"   duplicate {count(w.value(outcome, outcome='duplicate'))}"
        f"   stale {count(w.value(outcome, outcome='stale'))}",
        f"  lag           {count(lag_total):>12}"
        + (f"  {per_second(trend, signed=True):>10}" if trend is not None else "")
        + ("   (no partitions)" if lags == [] else ""),
    ]
    lines += [f"      {line}" for line in _partitions(lags, max(20, width - 6))]
    lines += table_lines(w)
    lines += [
        f"  end-to-end    {percentiles(w, 'cdc_consumer_end_to_end_seconds')}",
        f"  DLQ           {count(w.value(outcome, outcome='dlq')):>12}"
        f"  {per_second(w.rate(outcome, outcome='dlq')):>10}"
        f"   retries {count(w.value('cdc_consumer_retries_total'))}"
        f"   transient errors {count(w.value('cdc_consumer_transient_errors_total'))}{_kinds(w)}",
        f"  paused        {'-' if paused is None else 'YES' if paused else 'no'}"
        f"   db pool {count(in_use)}/{count(pool_max)} in use",
    ]
    return lines


def table_lines(w: Window) -> list[str]:
    """A line per replicated table: its events applied (and their rate), stale, dead-lettered,
    and whether it is held because its destination table differs from its changes."""
    name = "cdc_consumer_table_events_total"
    held = {labels.get("table", "?") for labels, v in w.m.series("cdc_consumer_drifted_tables") if v}
    tables = sorted({labels.get("table", "?") for labels, _ in w.m.series(name)} | held)
    if not tables:
        return []
    lines = ["  per table        applied        rate   stale     dlq"]
    for table in tables:
        lines.append(
            f"    {table[:26]:<26} {count(w.value(name, table=table, outcome='applied')):>10}"
            f"  {per_second(w.rate(name, table=table, outcome='applied')):>10}"
            f"  {count(w.value(name, table=table, outcome='stale')):>6}"
            f"  {count(w.value(name, table=table, outcome='dlq')):>6}"
            + ("   HELD: destination differs (see /ready)" if table in held else "")
        )
    return lines


@dataclass
class Target:
    """One daemon to watch: its kind (producer or consumer) and metrics URL (None: metrics off)."""

    kind: str
    url: str | None
    off_reason: str = ""
    last: Scrape | None = field(default=None, repr=False)


class Top:
    """Scrapes the targets and renders a screen; ``run()`` repeats until stopped."""

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be greater than 0")
        self.targets = list(targets)
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.stop_event = threading.Event()

    def refresh(self, once: bool = False) -> tuple[list[str], bool]:
        """Scrape every target once; the screen's lines and whether every daemon answered."""
        watched = [t for t in self.targets if t.url]
        with ThreadPoolExecutor(max_workers=max(1, len(watched))) as pool:
            scrapes = dict(
                zip(map(id, watched), pool.map(lambda t: fetch(t.url, self.timeout), watched), strict=True)
            )
        wall = self.clock()
        width = shutil.get_terminal_size((100, 24)).columns
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))
        span = (
            "rates and p50/p99 since each daemon started"
            if once
            else f"every {self.interval:g} s: rates and p50/p99 since the previous screen, or since start"
        )
        lines = [f"cdc top   {when}   ({span})"]
        for target in self.targets:
            lines += ["", *self.render(target, scrapes.get(id(target)), wall, width)]
        answered = all(t.url and scrapes[id(t)].reachable for t in self.targets)
        return lines, answered

    def render(self, target: Target, scrape: Scrape | None, wall: float, width: int = 100) -> list[str]:
        """One daemon's lines; ``scrape`` becomes the target's previous one."""
        if not target.url or scrape is None:
            return [f"{target.kind:<9} off: {target.off_reason}"]
        if scrape.metrics is None:
            return [f"{target.kind:<9} {target.url}   {scrape.error}"]
        w = Window(scrape, target.last, wall)
        target.last = scrape
        kind = scrape.metrics.label("cdc_build_info", "component") or target.kind
        header = f"{kind:<9} {scrape.url}   {_process(w)}".rstrip()
        body = producer_lines(w, scrape) if kind == "producer" else consumer_lines(w, scrape, width)
        return [header, *body]

    def once(self, out: IO[str]) -> bool:
        """Print one screen; True when every daemon answered."""
        lines, reachable = self.refresh(once=True)
        out.write("\n".join(lines) + "\n")
        out.flush()
        return reachable

    def run(self, out: IO[str]) -> None:
        """Refresh every ``interval`` until Ctrl-C or SIGTERM; on a terminal, redraw in place."""
        tty = out.isatty()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.stop_event.set())
        try:
            while not self.stop_event.is_set():
                started = time.monotonic()
                lines, _ = self.refresh()
                if tty:
                    out.write(HOME + "".join(f"{line}{ERASE_LINE}\n" for line in lines) + ERASE_BELOW)
                else:
                    out.write("\n".join(lines) + "\n\n")
                out.flush()
                self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def run_top(targets: Sequence[Target], *, interval: float, once: bool, out: IO[str] = sys.stdout) -> bool:
    """``python -m cdc top``: True when (with ``once``) every daemon answered."""
    top = Top(targets, interval=interval)
    if once:
        return top.once(out)
    top.run(out)
    return True


def _url(text: str) -> str:
    return text if "://" in text else f"http://{text}"


def _host(served_on: str) -> str:
    """Where to reach an endpoint served on ``served_on`` (METRICS_HOST) from this machine."""
    if served_on in ("0.0.0.0", "::"):  # every interface: this machine's loopback is one
        return "127.0.0.1"
    return f"[{served_on}]" if ":" in served_on else served_on


def targets(
    settings: Settings, *, producers: Sequence[str] | None = None, consumers: Sequence[str] | None = None
) -> list[Target]:
    """The daemons to watch: the URLs given, else each daemon's metrics port from the settings."""
    out = []
    for kind, urls in (("producer", producers), ("consumer", consumers)):
        if urls:
            out += [Target(kind, _url(u)) for u in urls]
        elif port := settings.metrics_port_of(kind):
            out.append(Target(kind, f"http://{_host(settings.metrics_host)}:{port}"))
        else:
            var = f"{kind.upper()}_METRICS_PORT"
            out.append(
                Target(
                    kind, None, f"metrics off ({var} and METRICS_PORT are 0 or unset); or pass --{kind} URL"
                )
            )
    return out

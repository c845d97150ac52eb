"""One stats object per daemon: it feeds the periodic log line, /metrics and the final report."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

# Latency samples kept per series for percentiles: recent enough to move, big enough for p99.
LATENCY_WINDOW = 10_000


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


class Stats:
    """Counters (only go up), gauges (current values) and latency series, thread-safe."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._gauges: dict[str, Any] = {}
        self._latency: dict[str, deque[float]] = {}
        self._last_line: str | None = None
        self._last_log = time.monotonic()
        self._last_count = 0
        self._last_count_at = time.monotonic()

    def incr(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] += n

    def set(self, key: str, value: Any) -> None:
        with self._lock:
            self._gauges[key] = value

    def observe(self, key: str, seconds: float) -> None:
        with self._lock:
            self._latency.setdefault(key, deque(maxlen=LATENCY_WINDOW)).append(seconds)

    def observe_many(self, key: str, seconds: Iterable[float]) -> None:
        """``observe`` for a whole batch at once (one lock, not one per event)."""
        with self._lock:
            self._latency.setdefault(key, deque(maxlen=LATENCY_WINDOW)).extend(seconds)

    def get(self, key: str) -> Any:
        with self._lock:
            return self._counters[key] if key in self._counters else self._gauges.get(key, 0)

    def get_stats(self) -> dict[str, Any]:
        """Counters, gauges, and p50/p99 (milliseconds) of every latency series."""
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            out.update(self._gauges)
            for key, values in self._latency.items():
                ordered = sorted(values)
                out[f"{key}_p50_ms"] = round(_percentile(ordered, 0.50) * 1000, 1)
                out[f"{key}_p99_ms"] = round(_percentile(ordered, 0.99) * 1000, 1)
        out["uptime_s"] = round(time.monotonic() - self.started, 1)
        return out

    def rate(self, key: str) -> float:
        """Per-second rate of counter ``key`` since the previous call."""
        now = time.monotonic()
        with self._lock:
            count = self._counters[key]
            elapsed = now - self._last_count_at
            value = (count - self._last_count) / elapsed if elapsed > 0 else 0.0
            self._last_count, self._last_count_at = count, now
        return value

    def line(self, keys: list[str], extra: dict[str, Any] | None = None) -> str:
        stats = self.get_stats()
        parts = [f"{k}={stats.get(k, 0)}" for k in keys]
        parts += [f"{k}={v}" for k, v in (extra or {}).items()]
        return " ".join(parts)

    def log_if_due(self, logger: logging.Logger, interval: float, keys: list[str], rate_key: str) -> None:
        """Log one stats line every ``interval`` seconds, only when something changed (arq style)."""
        now = time.monotonic()
        if now - self._last_log < interval:
            return
        self._last_log = now
        text = self.line(keys)
        if text == self._last_line:
            return
        self._last_line = text
        logger.info("stats %s rate=%.1f/s", text, self.rate(rate_key))

    def prometheus(self) -> str:
        """The stats in Prometheus text format (numbers only)."""
        lines = []
        for key, value in sorted(self.get_stats().items()):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric = f"cdc_{self.name}_{key}"
            lines.append(f"# TYPE {metric} {'counter' if key in self._counters else 'gauge'}")
            lines.append(f"{metric} {value}")
        return "\n".join(lines) + "\n"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

"""Logging set-up, called only by entry points (daemons and CLI commands)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# librdkafka repeats a connection error on every reconnect attempt: say it once per this long.
REPEAT_QUIET_SECONDS = 30.0


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _RepeatFilter(logging.Filter):
    """Drop a message like one let through less than REPEAT_QUIET_SECONDS ago (numbers ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        text = re.sub(r"\d+", "#", record.getMessage())
        if now - self._seen.get(text, -REPEAT_QUIET_SECONDS) < REPEAT_QUIET_SECONDS:
            return False
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[text] = now
        return True


def quiet_repeats(logger: logging.Logger) -> None:
    """For librdkafka's loggers only: our own lines must never be dropped as repeats."""
    logger.addFilter(_RepeatFilter())

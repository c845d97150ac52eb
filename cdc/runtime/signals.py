"""What both daemons share: signal handling and a capped exponential backoff."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from types import FrameType

from cdc.runtime import exits

log = logging.getLogger(__name__)


# Backoff for transient errors: 0.5 s, 1 s, 2 s, ... up to the cap, each +/- 20 %.
INITIAL_DELAY = 0.5
DELAY_BACKOFF = 2.0
DELAY_JITTER = 0.2


def backoff_delay(attempt: int, cap: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based)."""
    delay = min(cap, INITIAL_DELAY * DELAY_BACKOFF ** max(0, attempt - 1))
    return delay * (1 + random.uniform(-DELAY_JITTER, DELAY_JITTER))


class StopSignal:
    """SIGINT/SIGTERM flip ``running`` off; a second signal exits the process at once."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on stop. True if stopping."""
        return self._stop.wait(timeout)

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            log.warning("second %s: exiting now without finishing the batch", name)
            os._exit(exits.FORCED)
        log.info("%s received: finishing the current batch, then stopping (again to force)", name)
        self._stop.set()

"""An optional HTTP endpoint (METRICS_PORT) serving /metrics (Prometheus text) and /health."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cdc.errors import ConfigError
from cdc.stats import Stats

log = logging.getLogger(__name__)


class MetricsServer:
    def __init__(self, stats: Stats, port: int, health: Callable[[], bool] = lambda: True) -> None:
        self.stats = stats
        self.port = port
        self.health = health
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        stats, health = self.stats, self.health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body, ctype, code = stats.prometheus().encode(), "text/plain; version=0.0.4", 200
                elif self.path == "/health":
                    ok = health()
                    body = json.dumps({"ok": ok, **stats.get_stats()}, default=str).encode()
                    ctype, code = "application/json", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        except OSError as exc:
            raise ConfigError(f"METRICS_PORT={self.port} cannot be used: {exc.strerror}") from None
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on http://127.0.0.1:%d/metrics", self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

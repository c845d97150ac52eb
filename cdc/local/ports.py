"""The services' TCP ports: their defaults, ``CDC_*_PORT`` overrides, free ports for tests."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

from cdc.errors import ServiceError


@dataclass(frozen=True)
class Ports:
    kafka: int = 9092
    controller: int = 9093
    source_pg: int = 5432
    dest_pg: int = 5433
    # Brokers 2..n of a local cluster: (broker, controller) port pairs, flattened.
    extra: tuple[int, ...] = ()

    def kafka_nodes(self, count: int) -> list[tuple[int, int]]:
        """(broker port, controller port) of each node of a ``count``-node cluster."""
        nodes = [(self.kafka, self.controller)]
        for k in range(1, count):
            if len(self.extra) >= 2 * k:
                nodes.append((self.extra[2 * k - 2], self.extra[2 * k - 1]))
            else:  # next to the first node's ports: 9094/9095, 9096/9097 by default
                nodes.append((self.kafka + 2 * k, self.controller + 2 * k))
        return nodes

    @classmethod
    def from_env(cls) -> Ports:
        def port(name: str, default: int) -> int:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise ServiceError(f"{name}={raw!r} is not a TCP port")
            return int(raw)

        return cls(
            kafka=port("CDC_KAFKA_PORT", cls.kafka),
            controller=port("CDC_KAFKA_CONTROLLER_PORT", cls.controller),
            source_pg=port("CDC_SOURCE_PG_PORT", cls.source_pg),
            dest_pg=port("CDC_DEST_PG_PORT", cls.dest_pg),
        )

    def sasl_ports(self, count: int) -> list[int]:
        """The SASL_SSL listener port of each node: after the node pairs in ``extra``, else the
        node's broker port + 100 (9192 by default)."""
        pairs = 2 * (count - 1)
        if len(self.extra) >= pairs + count:
            return list(self.extra[pairs : pairs + count])
        return [port + 100 for port, _ in self.kafka_nodes(count)]

    @classmethod
    def free(cls, brokers: int = 1, secure: bool = False) -> Ports:
        """Distinct free loopback ports for the services (two more per extra broker, one more
        per broker with the SASL_SSL listener), for tests."""
        socks = []
        try:
            for _ in range(4 + 2 * (brokers - 1) + (brokers if secure else 0)):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            ports = [s.getsockname()[1] for s in socks]
            kafka, controller, source_pg, dest_pg = ports[:4]
            return cls(kafka, controller, source_pg, dest_pg, extra=tuple(ports[4:]))
        finally:
            for s in socks:
                s.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0

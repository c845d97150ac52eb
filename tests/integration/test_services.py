"""The local Kafka broker (cdc.local) against the real Kafka storage tool."""

from __future__ import annotations

import base64

from cdc.local.kafka import KafkaBroker
from cdc.local.ports import Ports


def test_storage_format_takes_a_cluster_id_that_starts_with_a_dash(tmp_path):
    # About one random id in 64 starts with "-": the storage tool must not read it as an option.
    cluster_id = base64.urlsafe_b64encode(b"\xf8" + bytes(range(1, 16))).rstrip(b"=").decode()
    assert cluster_id.startswith("-")
    ports = Ports.free()
    broker = KafkaBroker(home=tmp_path, port=ports.kafka, controller_port=ports.controller)
    broker._write_config()
    broker._format(cluster_id)
    meta = (broker.datadir / "meta.properties").read_text()
    assert f"cluster.id={cluster_id}\n" in meta

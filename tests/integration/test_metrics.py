"""A daemon whose metrics port is taken stops at start with one line (real services)."""

from __future__ import annotations

import socket

import pytest

from tests.support.consumer import consumer_env

pytestmark = pytest.mark.daemon


def test_a_port_in_use_is_a_one_line_error(private_settings, consumers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = consumers.start(consumer_env(private_settings, CONSUMER_METRICS_PORT=port))
        assert d.wait() == 2
    out = d.output()
    assert f"metrics endpoint 127.0.0.1:{port} cannot be used" in out
    assert "Traceback" not in out

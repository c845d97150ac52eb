"""The workload generator without services: it writes only to databases on this machine."""

from __future__ import annotations

import pytest

from cdc.errors import ConfigError
from cdc.ops.workload import Workload, check_local


def test_only_local_databases_unless_allowed():
    for url in (
        "postgresql://u:p@127.0.0.1:5432/db",
        "postgresql://u:p@localhost/db",
        "postgresql://u:p@[::1]:5432/db",
        "postgresql:///db?host=/var/run/postgresql",
    ):
        check_local(url)
    with pytest.raises(ConfigError, match=r"db\.example\.com is not this machine"):
        check_local("postgresql://u:p@db.example.com/db")
    with pytest.raises(ConfigError, match=r"10\.0\.0\.5 is not this machine"):
        Workload("postgresql://u:p@10.0.0.5/db")
    Workload("postgresql://u:p@10.0.0.5/db", allow_remote=True)  # checked, not connected, until start()

"""The producer LISTENs on the channel the source trigger notifies; CDC_NOTIFY_CHANNEL is not read."""

from __future__ import annotations

import logging
import re

from cdc.local.paths import SETUP_SOURCE_SQL
from cdc.runtime.settings import ENV_NAMES, NOTIFY_CHANNEL, load_settings

BASE = {"SOURCE_DB_URL": "postgresql://u:p@127.0.0.1:5432/src"}


def test_the_channel_is_the_triggers():
    channels = re.findall(r"pg_notify\('([^']*)'", SETUP_SOURCE_SQL.read_text())
    assert channels and set(channels) == {NOTIFY_CHANNEL}


def test_cdc_notify_channel_is_ignored_with_one_warning(caplog):
    assert "CDC_NOTIFY_CHANNEL" not in ENV_NAMES
    with caplog.at_level(logging.WARNING, logger="cdc.runtime.settings"):
        settings = load_settings(env={**BASE, "CDC_NOTIFY_CHANNEL": "elsewhere"}, dotenv_path=None)
    assert settings.notify_channel == NOTIFY_CHANNEL
    assert "notify_channel" not in settings.describe()
    [record] = caplog.records
    assert record.getMessage().startswith("CDC_NOTIFY_CHANNEL is no longer read")


def test_no_warning_when_unset(caplog):
    with caplog.at_level(logging.WARNING, logger="cdc.runtime.settings"):
        load_settings(env=BASE, dotenv_path=None)
    assert not caplog.records

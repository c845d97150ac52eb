"""One frozen settings object for both daemons, built once from the environment and ``.env``.

Precedence: CLI flags > real environment > ``.env`` > defaults. Every value is checked when the
object is built, so a typo stops the program at start-up with one line naming the variable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values

from cdc.errors import ConfigError

log = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")

# KAFKA_* variables read by Kafka's own shell scripts, not librdkafka properties.
_KAFKA_SCRIPT_VARS = {
    "KAFKA_HOME",
    "KAFKA_OPTS",
    "KAFKA_HEAP_OPTS",
    "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_LOG4J_OPTS",
    "KAFKA_JMX_OPTS",
    "KAFKA_DEBUG",
}

# The channel the source trigger notifies (pg_notify in setup_db.sql); fixed there, so not a setting.
NOTIFY_CHANNEL = "emp_records_cdc"
# Variables no longer read, and why: set, each gets one warning line and is ignored.
_RETIRED = {"CDC_NOTIFY_CHANNEL": f"the source trigger always notifies {NOTIFY_CHANNEL}"}


@dataclass(frozen=True)
class Settings:
    source_db_url: str = ""
    dest_db_url: str = ""
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    # Extra librdkafka properties from KAFKA_* variables, e.g. {"security.protocol": "SASL_SSL"}.
    kafka_extra: Mapping[str, str] = field(default_factory=dict)
    cdc_topic: str = "bf_employee_cdc"
    cdc_dlq_topic: str = "bf_employee_cdc_dlq"
    # Other tables' topics are PREFIX.schema.table (cdc.model.topics).
    cdc_topic_prefix: str = "cdc"
    # The largest message of another table's topic (a row image holds whole values: text, bytea,
    # json of megabytes): those topics' max.message.bytes, and the producers' limit.
    max_message_bytes: int = 16 * 1024 * 1024
    topic_partitions: int = 6
    topic_replication_factor: int = 1
    consumer_group_id: str = "cdc_consumer"
    producer_batch_size: int = 5000
    # A batch that was not full is followed by the next no sooner than this (see producer.py).
    producer_batch_interval_ms: int = 10
    consumer_batch_size: int = 5000
    poll_interval: float = 1.0
    consume_timeout: float = 1.0
    max_attempts: int = 3
    retry_backoff_max: float = 30.0
    db_pool_min: int = 1
    db_pool_max: int = 10
    statement_timeout_ms: int = 30000
    horizon_warn_seconds: float = 30.0
    prune: bool = False
    notify_channel: ClassVar[str] = NOTIFY_CHANNEL
    stats_interval: float = 10.0
    metrics_port: int = 0
    # Per daemon, for two daemons sharing one .env (None: METRICS_PORT); see metrics_port_of.
    producer_metrics_port: int | None = None
    consumer_metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    log_format: str = "text"
    # Consumer DLQ circuit breaker: stop when at least this share of the last window messages failed.
    dlq_breaker_window: int = 100
    dlq_breaker_ratio: float = 0.9
    # Seconds a foreign-key violation between replicated tables waits as a transient error, where
    # the consumer's role may not apply under session_replication_role = replica.
    fk_wait_seconds: float = 30.0

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict that is safe to log: passwords in URLs and secrets masked."""
        out = dataclasses.asdict(self)
        out["source_db_url"] = redact_url(self.source_db_url)
        out["dest_db_url"] = redact_url(self.dest_db_url)
        out["kafka_extra"] = {k: ("***" if _is_secret(k) else v) for k, v in sorted(self.kafka_extra.items())}
        return out

    def metrics_port_of(self, component: str) -> int:
        """The metrics port of "producer" or "consumer": its own setting, else METRICS_PORT (0 = off)."""
        own = self.producer_metrics_port if component == "producer" else self.consumer_metrics_port
        return self.metrics_port if own is None else own

    def describe(self) -> str:
        """One log line with every setting, secrets masked."""
        return " ".join(f"{k}={v}" for k, v in self.redacted().items())


# env name -> (field, parser)
def _str(v: str) -> str:
    return v.strip()


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {v!r}")


_ENV_FIELDS: dict[str, tuple[str, Any]] = {
    "SOURCE_DB_URL": ("source_db_url", _str),
    "DEST_DB_URL": ("dest_db_url", _str),
    "KAFKA_BOOTSTRAP_SERVERS": ("kafka_bootstrap_servers", _str),
    "CDC_TOPIC": ("cdc_topic", _str),
    "CDC_DLQ_TOPIC": ("cdc_dlq_topic", _str),
    "CDC_TOPIC_PREFIX": ("cdc_topic_prefix", _str),
    "CDC_FK_WAIT_SECONDS": ("fk_wait_seconds", float),
    "CDC_MAX_MESSAGE_BYTES": ("max_message_bytes", int),
    "CDC_TOPIC_PARTITIONS": ("topic_partitions", int),
    "CDC_TOPIC_REPLICATION_FACTOR": ("topic_replication_factor", int),
    "CONSUMER_GROUP_ID": ("consumer_group_id", _str),
    "PRODUCER_BATCH_SIZE": ("producer_batch_size", int),
    "PRODUCER_BATCH_INTERVAL_MS": ("producer_batch_interval_ms", int),
    "CONSUMER_BATCH_SIZE": ("consumer_batch_size", int),
    "POLL_INTERVAL": ("poll_interval", float),
    "CONSUME_TIMEOUT": ("consume_timeout", float),
    "MAX_ATTEMPTS": ("max_attempts", int),
    "RETRY_BACKOFF_MAX": ("retry_backoff_max", float),
    "DB_POOL_MIN": ("db_pool_min", int),
    "DB_POOL_MAX": ("db_pool_max", int),
    "STATEMENT_TIMEOUT_MS": ("statement_timeout_ms", int),
    "HORIZON_WARN_SECONDS": ("horizon_warn_seconds", float),
    "CDC_PRUNE": ("prune", _bool),
    "STATS_INTERVAL": ("stats_interval", float),
    "METRICS_PORT": ("metrics_port", int),
    "PRODUCER_METRICS_PORT": ("producer_metrics_port", int),
    "CONSUMER_METRICS_PORT": ("consumer_metrics_port", int),
    "METRICS_HOST": ("metrics_host", _str),
    "LOG_LEVEL": ("log_level", lambda v: v.strip().upper()),
    "LOG_FORMAT": ("log_format", lambda v: v.strip().lower()),
    "DLQ_BREAKER_WINDOW": ("dlq_breaker_window", int),
    "DLQ_BREAKER_RATIO": ("dlq_breaker_ratio", float),
}

ENV_NAMES = tuple(_ENV_FIELDS)


# Kafka properties shown as they are; every other one is masked (SASL/OAuth/SSL settings can
# hold secrets under many names, e.g. sasl.oauthbearer.config).
_KAFKA_SHOWN_PREFIXES = (
    "security.protocol",
    "sasl.mechanism",
    "sasl.username",
    "client.",
    "group.",
    "session.",
)


def _is_secret(prop: str) -> bool:
    return not prop.startswith(_KAFKA_SHOWN_PREFIXES) and any(
        w in prop
        for w in ("sasl", "ssl", "password", "secret", "key", "token", "jaas", "oauth", "credential")
    )


def redact_url(url: str) -> str:
    """Mask the password of a libpq URI (in the user info or a ``password=`` parameter)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)
        parts = parts._replace(netloc=netloc[0].split(":", 1)[0] + ":***@" + netloc[1])
    if parts.query:
        query = [
            f"{k}=***" if k.lower() in ("password", "sslpassword") else f"{k}={v}" if sep else k
            for k, sep, v in (item.partition("=") for item in parts.query.split("&"))
        ]
        parts = parts._replace(query="&".join(query))
    return urlunsplit(parts)


def _check_kafka_properties(props: Mapping[str, str]) -> None:
    """librdkafka checks names and values when a client is built: do that now, without connecting."""
    if not props:
        return
    from confluent_kafka import KafkaException, Producer

    try:
        Producer({**props, "log_level": 0})
    except KafkaException as exc:
        raise ConfigError(
            f"Kafka setting from a KAFKA_* variable is not valid: {exc.args[0].str()}"
        ) from None


def kafka_properties_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """Map KAFKA_FOO_BAR=x to the librdkafka property foo.bar=x (bootstrap servers excluded)."""
    props = {}
    for name, value in env.items():
        if not name.startswith("KAFKA_") or name in _KAFKA_SCRIPT_VARS:
            continue
        if name == "KAFKA_BOOTSTRAP_SERVERS":
            continue
        props[name[len("KAFKA_") :].lower().replace("_", ".")] = value
    return props


def load_settings(
    env: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike[str] | None = ".env",
    **overrides: Any,
) -> Settings:
    """Build and validate the settings. ``overrides`` (from CLI flags) win over everything.

    ``None`` overrides are ignored, so argparse defaults of ``None`` mean "not given".
    """
    merged: dict[str, str] = {}
    if dotenv_path is not None and os.path.exists(dotenv_path):
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ if env is None else env)
    for name, why in _RETIRED.items():
        if (merged.get(name) or "").strip():
            log.warning("%s is no longer read (%s); remove it", name, why)

    values: dict[str, Any] = {}
    for name, (fname, parse) in _ENV_FIELDS.items():
        raw = merged.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[fname] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r} is not valid: {exc}") from None
    values["kafka_extra"] = kafka_properties_from_env(merged)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in Settings.__dataclass_fields__:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = value
    settings = Settings(**values)
    validate(settings)
    return settings


def _env_name(fname: str) -> str:
    for name, (f, _) in _ENV_FIELDS.items():
        if f == fname:
            return name
    return fname


def validate(s: Settings) -> None:
    """Raise ConfigError naming the first bad setting."""

    def bad(fname: str, why: str) -> ConfigError:
        return ConfigError(f"{_env_name(fname)}={getattr(s, fname)!r} {why}")

    for fname in ("source_db_url", "dest_db_url"):
        url = getattr(s, fname)
        if url and urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise bad(fname, "is not a libpq URI (expected postgresql://user:password@host:port/db)")
    if not s.kafka_bootstrap_servers:
        raise bad("kafka_bootstrap_servers", "is empty (expected host:port[,host:port])")
    for server in s.kafka_bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit():
            raise bad("kafka_bootstrap_servers", f"has {server!r}, expected host:port")
    for fname in ("cdc_topic", "cdc_dlq_topic", "consumer_group_id"):
        if not getattr(s, fname):
            raise bad(fname, "must not be empty")
    if s.cdc_topic == s.cdc_dlq_topic:
        raise bad("cdc_dlq_topic", "must differ from CDC_TOPIC")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", s.cdc_topic_prefix):
        raise bad(
            "cdc_topic_prefix",
            "must be 1 to 100 letters, digits, '.', '_' or '-' (it starts Kafka topic names)",
        )
    for fname in ("cdc_topic", "cdc_dlq_topic"):
        if getattr(s, fname).startswith(s.cdc_topic_prefix + "."):
            raise bad(
                fname,
                f"must not start with CDC_TOPIC_PREFIX '{s.cdc_topic_prefix}.' (other tables' topics do)",
            )
    if not 1024 <= s.max_message_bytes <= 900_000_000:
        raise bad("max_message_bytes", "must be 1024 to 900000000 bytes")
    if s.fk_wait_seconds < 0:
        raise bad("fk_wait_seconds", "must be 0 or more")
    for fname in (
        "topic_partitions",
        "topic_replication_factor",
        "producer_batch_size",
        "consumer_batch_size",
        "max_attempts",
        "db_pool_min",
        "db_pool_max",
        "statement_timeout_ms",
    ):
        if getattr(s, fname) < 1:
            raise bad(fname, "must be at least 1")
    if s.db_pool_min > s.db_pool_max:
        raise bad("db_pool_min", f"is larger than DB_POOL_MAX={s.db_pool_max}")
    for fname in ("poll_interval", "consume_timeout", "retry_backoff_max", "stats_interval"):
        if getattr(s, fname) <= 0:
            raise bad(fname, "must be greater than 0")
    if s.horizon_warn_seconds < 0:
        raise bad("horizon_warn_seconds", "must not be negative")
    if not 0 <= s.producer_batch_interval_ms <= 1000:
        raise bad("producer_batch_interval_ms", "must be between 0 and 1000")
    for fname in ("metrics_port", "producer_metrics_port", "consumer_metrics_port"):
        port = getattr(s, fname)
        if port is not None and not 0 <= port <= 65535:
            raise bad(fname, "must be a TCP port (0 turns the endpoint off)")
    if not s.metrics_host:
        raise bad("metrics_host", "must not be empty (127.0.0.1, or 0.0.0.0 for every interface)")
    if s.log_level not in LOG_LEVELS:
        raise bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    if s.log_format not in LOG_FORMATS:
        raise bad("log_format", f"must be one of {', '.join(LOG_FORMATS)}")
    if s.dlq_breaker_window < 0:
        raise bad("dlq_breaker_window", "must not be negative (0 turns the breaker off)")
    if not 0 < s.dlq_breaker_ratio <= 1:
        raise bad("dlq_breaker_ratio", "must be greater than 0 and at most 1")
    _check_kafka_properties(s.kafka_extra)

"""Unit tests of the settings object: parsing, validation, secrets. No services needed."""

import pytest

from cdc.errors import ConfigError
from cdc.runtime.settings import kafka_properties_from_env, load_settings, redact_url

BASE = {
    "SOURCE_DB_URL": "postgresql://u:s3cret@127.0.0.1:5432/src",
    "DEST_DB_URL": "postgresql://u:s3cret@127.0.0.1:5433/dst",
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
}


def test_defaults_and_types():
    s = load_settings(env=BASE, dotenv_path=None)
    assert s.cdc_topic == "bf_employee_cdc"
    assert s.cdc_dlq_topic == "bf_employee_cdc_dlq"
    assert s.db_pool_min == 1 and s.db_pool_max == 10
    s = load_settings(env={**BASE, "CONSUMER_BATCH_SIZE": "250", "POLL_INTERVAL": "0.5"}, dotenv_path=None)
    assert s.consumer_batch_size == 250 and s.poll_interval == 0.5


def test_cli_overrides_win_and_none_means_not_given():
    s = load_settings(
        env={**BASE, "CDC_TOPIC": "from_env"}, dotenv_path=None, cdc_topic="from_cli", metrics_port=None
    )
    assert s.cdc_topic == "from_cli"
    assert s.metrics_port == 0


def test_each_daemon_has_its_own_metrics_port_else_the_shared_one():
    s = load_settings(env={**BASE, "METRICS_PORT": "9100", "CONSUMER_METRICS_PORT": "9102"}, dotenv_path=None)
    assert s.metrics_port_of("consumer") == 9102 and s.metrics_port_of("producer") == 9100
    s = load_settings(env={**BASE, "PRODUCER_METRICS_PORT": "0", "METRICS_PORT": "9100"}, dotenv_path=None)
    assert s.metrics_port_of("producer") == 0  # set to 0: off, whatever METRICS_PORT says
    assert load_settings(env=BASE, dotenv_path=None).metrics_port_of("consumer") == 0


def test_dotenv_loaded_but_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("CDC_TOPIC=from_dotenv\nCONSUMER_GROUP_ID=g_dotenv\n")
    s = load_settings(env={**BASE, "CDC_TOPIC": "from_env"}, dotenv_path=env_file)
    assert s.cdc_topic == "from_env"
    assert s.consumer_group_id == "g_dotenv"


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("CONSUMER_BATCH_SIZE", "lots", "CONSUMER_BATCH_SIZE='lots' is not valid"),
        ("CONSUMER_BATCH_SIZE", "0", "must be at least 1"),
        ("SOURCE_DB_URL", "mysql://x", "not a libpq URI"),
        ("KAFKA_BOOTSTRAP_SERVERS", "localhost", "expected host:port"),
        ("LOG_LEVEL", "chatty", "must be one of"),
        ("METRICS_PORT", "70000", "must be a TCP port"),
        ("CONSUMER_METRICS_PORT", "-1", "must be a TCP port"),
        ("PRODUCER_METRICS_PORT", "x", "is not valid"),
        ("CDC_PRUNE", "maybe", "expected true/false"),
        ("CDC_DLQ_TOPIC", "bf_employee_cdc", "must differ"),
        ("CDC_TOPIC_PREFIX", "my prefix", "letters, digits"),
    ],
)
def test_bad_values_give_one_line_naming_the_variable(name, value, words):
    with pytest.raises(ConfigError) as info:
        load_settings(env={**BASE, name: value}, dotenv_path=None)
    msg = str(info.value)
    assert name in msg and words in msg
    assert "\n" not in msg


def test_kafka_variables_map_to_librdkafka_properties():
    props = kafka_properties_from_env(
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "PLAIN",
            "KAFKA_BOOTSTRAP_SERVERS": "b:9092",
            "KAFKA_HOME": "/opt/kafka",
            "OTHER": "x",
        }
    )
    assert props == {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}


def test_secrets_never_in_description():
    s = load_settings(env={**BASE, "KAFKA_SASL_PASSWORD": "hunter2"}, dotenv_path=None)
    text = s.describe()
    assert "s3cret" not in text and "hunter2" not in text
    assert "u:***@127.0.0.1:5432/src" in text


def test_redact_url_without_password_is_unchanged():
    assert redact_url("postgresql://u@h:1/d") == "postgresql://u@h:1/d"
    assert redact_url("postgresql://u:p@h:1/d") == "postgresql://u:***@h:1/d"


def test_password_in_the_query_string_is_masked():
    url = "postgresql://u@h:1/d?sslmode=require&password=s3cret"
    assert redact_url(url) == "postgresql://u@h:1/d?sslmode=require&password=***"


def test_kafka_secrets_under_any_name_are_masked():
    s = load_settings(
        env={**BASE, "KAFKA_SASL_OAUTHBEARER_CONFIG": "clientSecret=abc", "KAFKA_SSL_KEY_PEM": "-----x"},
        dotenv_path=None,
    )
    assert "abc" not in s.describe() and "-----x" not in s.describe()


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"KAFKA_CLUSTER_ID": "abc"}, 'No such configuration property: "cluster.id"'),
        ({"KAFKA_ACKS": "most"}, "Invalid value"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN"}, "sasl.username"),
    ],
)
def test_bad_kafka_properties_are_one_line_at_start(env, words):
    with pytest.raises(ConfigError) as info:
        load_settings(env={**BASE, **env}, dotenv_path=None)
    assert words in str(info.value) and "\n" not in str(info.value)

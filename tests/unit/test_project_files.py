"""Checks of files users rely on but that cannot run here: docker-compose.yml and .env.example."""

from pathlib import Path

import yaml

from cdc.runtime.settings import ENV_NAMES, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_docker_compose_matches_local_defaults():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    # The three services `docker compose up` starts; the daemons come only with their profile.
    assert {n for n, s in services.items() if "profiles" not in s} == {"kafka", "db_source", "db_dst"}
    assert {n for n, s in services.items() if "pipeline" in s.get("profiles", ())} == {"producer", "consumer"}
    assert "9092:9092" in services["kafka"]["ports"]
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "5432:5432" in services["db_source"]["ports"]
    assert "5433:5432" in services["db_dst"]["ports"]
    for name, sql in (("db_source", "setup_db.sql"), ("db_dst", "setup_db_with_idempotency.sql")):
        mounts = services[name]["volumes"]
        assert any(m.startswith(f"./{sql}:/docker-entrypoint-initdb.d/") for m in mounts)
        assert (ROOT / sql).exists()


def test_env_example_documents_every_setting_and_loads():
    text = (ROOT / ".env.example").read_text()
    for name in ENV_NAMES:
        assert f"{name}=" in text, f"{name} missing from .env.example"
    s = load_settings(env={}, dotenv_path=ROOT / ".env.example")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert s.source_db_url.endswith(":5432/" + compose["services"]["db_source"]["environment"]["POSTGRES_DB"])
    assert s.dest_db_url.endswith(":5433/" + compose["services"]["db_dst"]["environment"]["POSTGRES_DB"])

"""The ``.env`` file ``make up`` writes: the services' URLs and the daemons' metrics ports."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# The daemons' metrics ports that `make up` writes into .env (each daemon reads its own, else
# METRICS_PORT): distinct, so both run on one machine, and what `make monitor` scrapes.
METRICS_PORTS = {"PRODUCER_METRICS_PORT": 9101, "CONSUMER_METRICS_PORT": 9102}


def metrics_ports(current: Mapping[str, str | None]) -> dict[str, str]:
    """``METRICS_PORTS`` as .env values: where ``current`` (the environment over the .env file)
    already sets a port, that one, so `make up` never moves a port the user chose. 0 (off, as in
    .env.example) counts as unset: `make up` prepares the daemons for `make monitor`."""
    chosen = {name: (current.get(name) or "").strip() for name in METRICS_PORTS}
    return {
        name: chosen[name] if chosen[name] not in ("", "0") else str(default)
        for name, default in METRICS_PORTS.items()
    }


def write_dotenv(path: Path, values: dict[str, str]) -> None:
    """Set ``values`` in a .env file, keeping every other line the user wrote there."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [ln for ln in lines if ln.split("=", 1)[0].strip() not in values]
    kept += [f"{k}={v}" for k, v in values.items()]
    path.write_text("\n".join(kept) + "\n")
    path.chmod(0o600)

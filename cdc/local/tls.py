"""A private certificate authority for the local services' TLS (``openssl``, made at ``make up``).

``make_ca(folder)`` writes, once (kept on later calls):

- ``ca.pem`` / ``ca.key``: a self-signed CA, valid 10 years; clients trust ``ca.pem``;
- ``server.pem`` / ``server.key``: a server certificate signed by it for ``localhost`` and
  ``127.0.0.1`` (PKCS#8 key, unencrypted, mode 0600);
- ``server-bundle.pem``: key + certificate in one file (what Kafka's PEM keystore reads).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cdc.errors import ServiceError

DAYS = "3650"


@dataclass(frozen=True)
class Certificates:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def key(self) -> Path:
        return self.folder / "server.key"

    @property
    def bundle(self) -> Path:
        return self.folder / "server-bundle.pem"


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if not openssl:
        raise ServiceError("openssl not found: install it (apt-get install openssl) for the TLS listeners")
    proc = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise ServiceError(f"openssl {args[0]} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")


def make_ca(folder: Path) -> Certificates:
    certs = Certificates(folder)
    if certs.bundle.exists():
        return certs
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca.key", cwd=folder
    )
    _openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", DAYS,
        "-subj", "/CN=cdc local CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem", cwd=folder,
    )  # fmt: skip
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "server.key", cwd=folder
    )
    _openssl("req", "-new", "-key", "server.key", "-subj", "/CN=localhost", "-out", "server.csr", cwd=folder)
    (folder / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", DAYS, "-sha256", "-extfile", "server.ext", "-out", "server.pem", cwd=folder,
    )  # fmt: skip
    for name in ("ca.key", "server.key"):
        (folder / name).chmod(0o600)
    bundle = certs.key.read_text() + certs.cert.read_text()
    certs.bundle.write_text(bundle)
    certs.bundle.chmod(0o600)
    for name in ("ca.pem", "server.pem"):
        (folder / name).chmod(0o644)
    return certs

"""The cloud server reads its TLS certificate's validity dates at start (issue 20, item 8).

An expired certificate, or one not valid yet, is refused with one line naming the file and the
date (gRPC would serve it, and every client would only report "TLS handshake failed"); one that
expires within 30 days starts, with a WARNING in the log. Each test runs the real server.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from dlheir.client.cloud import CloudClient
from dlheir.procs import free_port
from dlheir.server.testing import CloudServerProcess, self_signed_certificate


def _certificate(folder: Path, not_before: datetime, not_after: datetime) -> tuple[Path, Path]:
    """(cert.pem, key.pem): a self-signed certificate for 127.0.0.1 with these dates (the openssl
    CLI of OpenSSL 3.0 cannot back-date one)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _refusal(data_dir: Path, cert: Path, key: Path) -> str:
    """Start the real server with this certificate, expecting a one-line refusal; returns the line."""
    proc = subprocess.run([sys.executable, "-m", "dlheir.server", "--data-dir", str(data_dir), "--port",
                           str(free_port()), "--tls-cert", str(cert), "--tls-key", str(key)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_expired_certificate_is_refused_naming_the_date(tmp_path):
    now = datetime.now(timezone.utc)
    cert, key = _certificate(tmp_path / "old", now - timedelta(days=400), now - timedelta(days=35))
    line = _refusal(tmp_path / "d", cert, key)
    expiry = (now - timedelta(days=35)).strftime("%Y-%m-%d")
    assert str(cert) in line and "expired" in line and expiry in line and "renew" in line, line
    assert "port" not in line, line


def test_certificate_not_yet_valid_is_refused_naming_the_date(tmp_path):
    now = datetime.now(timezone.utc)
    cert, key = _certificate(tmp_path / "new", now + timedelta(days=3), now + timedelta(days=400))
    line = _refusal(tmp_path / "d", cert, key)
    start = (now + timedelta(days=3)).strftime("%Y-%m-%d")
    assert str(cert) in line and "not valid before" in line and start in line and "clock" in line, line


def test_certificate_expiring_soon_starts_with_a_warning(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    (tmp_path / "soon").mkdir()
    cert, key = self_signed_certificate(tmp_path / "soon", days=10)
    with CloudServerProcess(tmp_path / "cloud", tls_cert=cert, tls_key=key) as server:
        with CloudClient(server.address, tls_ca=str(cert)) as admin:  # it serves over TLS
            assert admin.list_collections(server.admin_token) == []
    log = (server.data_dir / "server.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING dlheir.server" in line and "expires on" in line]
    assert len(warnings) == 1 and str(cert) in warnings[0] and "renew" in warnings[0], log
    expiry = (datetime.now(timezone.utc) + timedelta(days=10)).strftime("%Y-%m-%d")
    assert expiry in warnings[0], warnings[0]


def test_certificate_valid_for_long_starts_without_a_warning(tmp_path):
    now = datetime.now(timezone.utc)
    cert, key = _certificate(tmp_path / "ok", now - timedelta(days=1), now + timedelta(days=90))
    with CloudServerProcess(tmp_path / "cloud", tls_cert=cert, tls_key=key):
        pass
    log = (tmp_path / "cloud" / "server.log").read_text()
    assert "listening on" in log and "expires on" not in log and "WARNING" not in log, log

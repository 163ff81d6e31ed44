"""The stack broker's SASL_SSL listener configuration (pure) and its certificates."""

from __future__ import annotations

import ssl
from pathlib import Path

from cbtctl.stack.certs import ensure_certs
from cbtctl.stack.kafka import server_properties
from cbtstream.config import StackSettings


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line
                and not line.startswith("#"))


def test_sasl_listener_added_next_to_plaintext() -> None:
    stack = StackSettings(kafka_port=29092, kafka_controller_port=29093, kafka_sasl_port=29094)
    p = _props(server_properties(stack, Path("/d"), Path("/tls/ks.pem")))
    assert p["listeners"].split(",") == ["PLAINTEXT://127.0.0.1:29092",
                                         "CONTROLLER://127.0.0.1:29093",
                                         "SASL_SSL://127.0.0.1:29094"]
    assert "SASL_SSL://127.0.0.1:29094" in p["advertised.listeners"]
    assert p["inter.broker.listener.name"] == "PLAINTEXT"
    assert p["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert "ScramLoginModule required" in p[
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    assert p["listener.name.sasl_ssl.ssl.keystore.location"] == "/tls/ks.pem"
    assert not any("password" in k for k in p)  # no secret in server.properties


def test_sasl_listener_off() -> None:
    stack = StackSettings(kafka_sasl_port=0)
    p = _props(server_properties(stack, Path("/d"), Path("/tls/ks.pem")))
    assert "SASL_SSL" not in p["listeners"]
    assert "sasl.enabled.mechanisms" not in p


def test_certificates_verify_for_localhost(tmp_path: Path) -> None:
    files = ensure_certs(tmp_path / "tls")
    assert ensure_certs(tmp_path / "tls").ca_cert.read_bytes() == files.ca_cert.read_bytes()
    assert (files.server_key.stat().st_mode & 0o077) == 0
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.server_cert, files.server_key)  # key matches certificate
    client = ssl.create_default_context(cafile=str(files.ca_cert))
    assert client.check_hostname

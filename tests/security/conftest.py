"""Fixtures for the security tests: isolated settings whose Kafka clients use the dev stack's
``SASL_SSL`` listener (SCRAM-SHA-512, broker certificate from the stack's CA, verified)."""

from __future__ import annotations

import socket

import pytest

from cbtctl.stack.kafka import SASL_MECHANISM, Kafka
from cbtstream.config import KafkaSettings, Settings


def sasl_kafka(settings: Settings) -> KafkaSettings:
    """``settings.kafka`` pointed at the stack's SASL_SSL listener, password read from the
    stack's password file (the ``*_password_file`` path of the settings)."""
    broker = Kafka(settings)
    return KafkaSettings.model_validate(settings.kafka.model_dump() | {
        "bootstrap_servers": broker.sasl_bootstrap,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": SASL_MECHANISM,
        "sasl_username": settings.stack.kafka_sasl_username,
        "sasl_password": None,
        "sasl_password_file": broker.sasl_password_file,
        "ssl_cafile": broker.certs.ca_cert,
        "ssl_verify": True,
    })  # validated, so the password file is read


@pytest.fixture
def sasl_settings(kafka_settings: Settings) -> Settings:
    """Isolated settings (own topic prefix, topics created) talking SASL_SSL to the broker."""
    broker = Kafka(kafka_settings)
    if not broker.sasl_enabled or not broker.sasl_password_file.is_file():
        pytest.fail("the stack's Kafka has no SASL_SSL listener configured: run `cbtstream "
                    "stack up` (and restart Kafka if it says so)")
    host, port = broker.sasl_bootstrap.split(":")
    with socket.socket() as s:
        if s.connect_ex((host, int(port))) != 0:
            pytest.fail(f"nothing listens on {broker.sasl_bootstrap}: restart the stack's Kafka "
                        "(`cbtstream stack up` says when a restart is needed)")
    kafka = sasl_kafka(kafka_settings)
    return kafka_settings.model_copy(update={"kafka": kafka})

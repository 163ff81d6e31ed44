"""Kafka over SASL_SSL (SCRAM-SHA-512) against the dev broker's secured listener: the publisher,
a consumer and the Faust worker all connect with certificate verification on; a wrong password
and an untrusted CA fail with clear, password-free errors; ``ssl_verify=false`` is the only way
to skip verification."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from cbtctl.demo.processes import Proc
from cbtctl.stack.certs import make_certs
from cbtstream.config import KafkaSettings, Settings
from cbtstream.kafka import KafkaAuthError, Publisher, client_kwargs, ssl_context
from schemas.codec import decode
from schemas.events import SnapshotTaken, SyncPlanned
from schemas.topics import SNAPSHOT_TAKEN, SYNC_PLANNED
from tests.support import read_topic
from tests.unit.factories import EPOCH_A, disk, snap

WRONG = "wrong-Pa55-5c1f9e"


def snapshot_taken() -> SnapshotTaken:
    return snap(disk(2000 + datetime.now(UTC).microsecond % 1000), f"{EPOCH_A}/7")


def test_verification_is_on_by_default() -> None:
    k = KafkaSettings(security_protocol="SASL_SSL")
    assert k.ssl_verify
    ctx = ssl_context(k)
    assert ctx is not None and ctx.check_hostname and ctx.verify_mode.name == "CERT_REQUIRED"
    assert client_kwargs(k)["ssl_context"] is not None


@pytest.mark.integration
async def test_publish_and_consume_over_sasl_ssl(sasl_settings: Settings) -> None:
    assert sasl_settings.kafka.sasl_password is not None  # read from the password file
    ev = snapshot_taken()
    async with Publisher(sasl_settings.kafka) as pub:
        await pub.publish(ev)
    got = await read_topic(sasl_settings, SNAPSHOT_TAKEN, until=lambda evs: len(evs) >= 1,
                           timeout=20)
    assert got == [ev]


@pytest.mark.integration
async def test_wrong_password_is_a_clear_error(sasl_settings: Settings) -> None:
    kafka = sasl_settings.kafka.model_copy(
        update={"sasl_password": SecretStr(WRONG), "sasl_password_file": None})
    with pytest.raises(KafkaAuthError) as info:
        async with Publisher(kafka):
            pass
    msg = str(info.value)
    assert "SCRAM-SHA-512 login as 'cbtstream' refused" in msg
    assert "invalid credentials" in msg
    assert WRONG not in msg and WRONG not in repr(info.value.__cause__)
    assert not info.value.retriable


@pytest.mark.integration
@pytest.mark.parametrize("trust", ["other-ca", "system-store"])
async def test_untrusted_broker_certificate_is_refused(
    sasl_settings: Settings, tmp_path: Path, trust: str
) -> None:
    cafile = make_certs(tmp_path / "other").ca_cert if trust == "other-ca" else None
    kafka = sasl_settings.kafka.model_copy(update={"ssl_cafile": cafile})
    with pytest.raises(KafkaAuthError, match="TLS certificate not trusted"):
        async with Publisher(kafka):
            pass


@pytest.mark.integration
async def test_verification_opt_out_is_explicit(sasl_settings: Settings) -> None:
    """With ``ssl_verify=false`` and no CA (the setup refused in the test above), the publisher
    talks SASL_SSL to the broker without verifying it: the record is stored, and a consumer on
    the same unverified settings reads it back where the broker said it put it."""
    kafka = sasl_settings.kafka.model_copy(update={"ssl_cafile": None, "ssl_verify": False})
    ctx = client_kwargs(kafka)["ssl_context"]
    assert kafka.security_protocol == "SASL_SSL"
    assert ctx.verify_mode.name == "CERT_NONE" and not ctx.check_hostname
    ev = snapshot_taken()
    async with Publisher(kafka) as pub:
        partition, offset = await pub.publish(ev)
    assert 0 <= partition < kafka.partitions and offset >= 0
    unverified = sasl_settings.model_copy(update={"kafka": kafka})
    where = (partition, offset)
    records = await read_topic(unverified, SNAPSHOT_TAKEN, raw=True, timeout=20,
                               until=lambda rs: any((r.partition, r.offset) == where for r in rs))
    (record,) = [r for r in records if (r.partition, r.offset) == where]
    assert decode(record.value, key=record.key) == ev


@pytest.mark.integration
async def test_faust_worker_over_sasl_ssl(sasl_settings: Settings, tmp_path: Path) -> None:
    """The planner worker consumes a snapshot and plans its sync, all through SASL_SSL (the
    worker's own consumer, producer, table changelog and admin client)."""
    settings = sasl_settings.model_copy(update={
        "streams": sasl_settings.streams.model_copy(update={"remove_snapshots": False})})
    worker = Proc(["worker"], settings, tmp_path / "worker.log")
    try:
        ev = snapshot_taken()
        async with Publisher(settings.kafka) as pub:
            await pub.publish(ev)
        plans = await read_topic(settings, SYNC_PLANNED, until=lambda e: len(e) >= 1,
                                 timeout=60, watch=(worker,))
        assert isinstance(plans[0], SyncPlanned)
        assert plans[0].disk == ev.disk
    finally:
        worker.stop()

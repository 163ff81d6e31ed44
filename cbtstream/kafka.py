"""The Kafka adapter: connection options, the event publisher and topic administration.

This is the module that imports aiokafka's producer and admin client. Consumers of the pipeline
build their ``AIOKafkaConsumer`` with :func:`client_kwargs` so security settings live in one place.
Every publish waits for ``acks=all`` with an idempotent producer: a commit event that was not
acknowledged is retried, and consumers drop duplicates by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)
from aiokafka.partitioner import murmur2
from pydantic import BaseModel

from cbtstream.config import KafkaSettings
from cbtstream.errors import CbtStreamError, TransientError
from cbtstream.topic_check import TopicLayout, TopicReport, catalogue_layout, layout_report
from schemas.codec import MAX_REQUEST_BYTES, Headers, encode
from schemas.events import DEFAULT_POOL
from schemas.topics import TopicSpec, topic_for

#: Kafka's TOPIC_ALREADY_EXISTS error code (in a CreateTopics response).
_ALREADY_EXISTS = 36


class KafkaUnavailable(TransientError):
    """The broker did not acknowledge in time; the caller may retry."""

    reason = "kafka_unavailable"


class KafkaAuthError(CbtStreamError):
    """The broker refused our credentials or we refused its certificate: retrying won't help."""

    reason = "kafka_auth_failed"


async def explain_connect_failure(settings: KafkaSettings) -> CbtStreamError | None:
    """Why a connection to the first bootstrap server fails, as our error, or None if it works.

    aiokafka only logs the cause of a failed bootstrap ("Unable to bootstrap from ..."); this
    opens one connection the same way to surface it: a refused SASL login or an untrusted
    certificate becomes :class:`KafkaAuthError`. The message names the user, never the password.
    """
    host, _, port = settings.bootstrap_servers.split(",")[0].strip().rpartition(":")
    kwargs = client_kwargs(settings)
    del kwargs["bootstrap_servers"]
    where = f"Kafka at {host}:{port} ({settings.security_protocol})"
    try:
        conn = await create_conn(host, int(port), request_timeout_ms=10000, **kwargs)
    except ssl.SSLCertVerificationError as exc:
        return KafkaAuthError(
            f"{where}: TLS certificate not trusted ({exc.verify_message}); set kafka.ssl_cafile "
            "to the CA that signed it (kafka.ssl_verify=false only for a lab)")
    except ssl.SSLError as exc:
        return KafkaAuthError(f"{where}: TLS handshake failed: {exc.reason or exc}")
    except (SaslAuthenticationFailed, UnsupportedSaslMechanismError) as exc:
        return KafkaAuthError(
            f"{where}: SASL {settings.sasl_mechanism} login as {settings.sasl_username!r} "
            f"refused: {exc}")
    except (OSError, TimeoutError, KafkaError, ValueError) as exc:
        return KafkaUnavailable(f"{where}: {type(exc).__name__}: {exc}")
    conn.close()
    return None


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    ctx = ssl.create_default_context(
        cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
    )
    if not settings.ssl_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by every aiokafka client we create."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    ctx = ssl_context(settings)
    if ctx is not None:
        kwargs["ssl_context"] = ctx
    if settings.sasl_mechanism:
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else None
        )
    return kwargs


def copier_group_id(prefix: str, pool: str) -> str:
    """The consumer group of a copier pool's members. The default pool keeps the group of the
    copiers that predate pools, so an upgrade resumes from its committed offsets."""
    return f"{prefix}cbtstream-copier" + ("" if pool == DEFAULT_POOL else f".{pool}")


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as aiokafka and Faust use it) gives a
    record key: where a disk's events, and so its row of the planner's table, live. Pure, about
    30 us a key: cache it when called per row."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def topic_name(spec: TopicSpec, settings: KafkaSettings) -> str:
    return spec.full_name(settings.topic_prefix)


class Publisher:
    """Publishes events to their topic, keyed by disk key, with type headers.

    Use ``async with Publisher(settings) as pub: await pub.publish(event)``. ``stop()`` may be
    called twice.
    """

    def __init__(self, settings: KafkaSettings, *, linger_ms: int = 5) -> None:
        self._settings = settings
        self._producer = AIOKafkaProducer(
            **client_kwargs(settings),
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            max_request_size=MAX_REQUEST_BYTES,  # a dead letter may be large
        )
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()  # a half-started producer still holds its client
            cause = await explain_connect_failure(self._settings)
            if isinstance(cause, KafkaAuthError):
                raise cause from exc
            raise KafkaUnavailable(f"cannot connect to Kafka: {exc}") from exc
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._producer.stop()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def publish(self, event: BaseModel) -> tuple[int, int]:
        """Publish and wait for the broker's acknowledgement; returns (partition, offset)."""
        key, value, headers = encode(event)
        return await self.publish_raw(topic_name(topic_for(event), self._settings), key, value,
                                      headers)

    async def publish_raw(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers
    ) -> tuple[int, int]:
        try:
            meta = await self._producer.send_and_wait(topic, value=value, key=key,
                                                      headers=headers)
        except KafkaError as exc:
            raise KafkaUnavailable(f"publish to {topic} failed: {exc}") from exc
        return meta.partition, meta.offset

    async def flush(self) -> None:
        await self._producer.flush()


async def create_topics(settings: KafkaSettings) -> list[str]:
    """Create every topic of the catalogue that is missing, after checking those that exist
    (``cbtstream.topic_check``: raises ``TopicsMismatch`` naming every error, logs the
    warnings); returns the names created now. Topics it creates match by construction."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    try:
        await admin.start()
        return await _create_checked(admin, settings, catalogue_layout(settings))
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot create topics: {exc}") from exc
    finally:
        await admin.close()


async def _create_checked(admin: AIOKafkaAdminClient, settings: KafkaSettings,
                          layout: TopicLayout) -> list[str]:
    """Check the topics of ``layout`` that exist, create the others, then check those the
    broker says exist already (a concurrent creator, or a topic the metadata did not list yet);
    returns the names created now."""
    existing = set(await admin.list_topics())
    (await _inspect(admin, settings, layout, existing)).enforce()
    new = [NewTopic(name=name, num_partitions=parts,
                    replication_factor=settings.replication_factor, topic_configs=config)
           for name, (parts, config) in layout.items() if name not in existing]
    if not new:
        return []
    try:
        resp = await admin.create_topics(new)
        codes = {name: code for name, code, *_ in getattr(resp, "topic_errors", [])}
    except TopicAlreadyExistsError:
        codes = {t.name: _ALREADY_EXISTS for t in new}
    for name, code in codes.items():
        if code not in (0, _ALREADY_EXISTS):
            raise CbtStreamError(f"creating topic {name} failed: error {code}")
    raced = {t.name: layout[t.name] for t in new if codes.get(t.name) == _ALREADY_EXISTS}
    deadline = time.monotonic() + 10
    while raced:
        report = await _inspect(admin, settings, raced, set(raced))
        report.enforce()
        if not report.missing or time.monotonic() > deadline:
            break
        raced = {n: raced[n] for n in report.missing}  # not described yet
        await asyncio.sleep(0.2)
    return [t.name for t in new if codes.get(t.name, 0) == 0]


async def _describe(admin: AIOKafkaAdminClient, names: list[str], keys: set[str]
                    ) -> TopicLayout:
    """Partition count and the settings ``keys`` of each topic of ``names`` that exists."""
    if not names:
        return {}
    meta = await admin.describe_topics(names)
    parts = {t["topic"]: len(t["partitions"]) for t in meta if t["error_code"] == 0}
    configs: dict[str, dict[str, str]] = {}
    if parts and keys:
        resources = [ConfigResource(ConfigResourceType.TOPIC, n, dict.fromkeys(keys))
                     for n in parts]
        for resp in await admin.describe_configs(resources):
            for r in resp.to_object()["resources"]:
                if r["error_code"] == 0:
                    configs[r["resource_name"]] = {
                        e["config_names"]: e["config_value"] for e in r["config_entries"]
                        if e["config_value"] is not None}
    return {n: (count, configs.get(n, {})) for n, count in parts.items()}


async def _inspect(admin: AIOKafkaAdminClient, settings: KafkaSettings, expected: TopicLayout,
                   existing: set[str]) -> TopicReport:
    """The report on those of the ``expected`` topics that are in ``existing``; the others
    are listed as missing."""
    keys = {k for _, config in expected.values() for k in config}
    actual = await _describe(admin, [n for n in expected if n in existing], keys)
    return layout_report(settings, expected, actual)


async def check_topics(settings: KafkaSettings, expected: TopicLayout | None = None
                       ) -> TopicReport:
    """Compare the cluster's topics with ``expected`` (default: the catalogue)."""
    expected = catalogue_layout(settings) if expected is None else expected
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    try:
        await admin.start()
        return await _inspect(admin, settings, expected, set(await admin.list_topics()))
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot read the topics: {exc}") from exc
    finally:
        await admin.close()


async def topic_partitions(
    consumer: AIOKafkaConsumer, name: str, *, timeout_s: float = 30.0
) -> list[TopicPartition]:
    """The partitions of topic ``name``, refreshing the client's metadata until they are known
    (a topic created a moment ago is not in the metadata yet). Raises ``LookupError`` if the
    topic does not appear within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    parts = consumer.partitions_for_topic(name)
    while not parts:
        if time.monotonic() > deadline:
            raise LookupError(f"topic {name} does not exist")
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(name)
        if not parts:
            await asyncio.sleep(0.2)
    return [TopicPartition(name, p) for p in sorted(parts)]


@contextlib.asynccontextmanager
async def offset_clients(
    settings: KafkaSettings,
) -> AsyncIterator[tuple[AIOKafkaAdminClient, AIOKafkaConsumer]]:
    """An admin client and a group-less consumer, started, for reading end and committed
    offsets; both are closed on exit."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    consumer = AIOKafkaConsumer(**client_kwargs(settings), group_id=None,
                                enable_auto_commit=False)
    try:
        await admin.start()
        await consumer.start()
        yield admin, consumer
    finally:
        await consumer.stop()
        await admin.close()


async def committed_offsets(admin: AIOKafkaAdminClient, group: str,
                            tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """``group``'s committed offset of each of ``tps`` it has committed (the others absent)."""
    committed = await admin.list_consumer_group_offsets(group, partitions=tps)
    return {tp: m.offset for tp, m in committed.items() if m is not None and m.offset >= 0}


async def group_members(settings: KafkaSettings, groups: list[str]) -> dict[str, list[str]]:
    """The members of each of ``groups`` that could be described, as ``client_id@host`` (an
    empty list: no live member, or no such group; a group missing from the result: not known).

    One request per group: aiokafka 0.14 misreads a response that describes several groups
    when one of them does not exist (the fields shift, then the connection is dropped), so a
    failed group costs only its own answer. Raises ``KafkaUnavailable`` when no group could be
    described at all."""
    found: dict[str, list[str]] = {}
    error: Exception | None = None
    for group in groups:
        admin = AIOKafkaAdminClient(**client_kwargs(settings))
        try:
            await admin.start()
            for response in await admin.describe_consumer_groups([group]):
                for g in response.to_object()["groups"]:
                    if g.get("error_code") == 0 and g.get("group") == group:
                        found[group] = sorted(
                            f"{m.get('client_id', '')}@{str(m.get('client_host', '')).lstrip('/')}"
                            for m in g.get("members", ()))
        except (KafkaError, ValueError) as exc:
            error = exc
        finally:
            await admin.close()
    if groups and not found and error is not None:
        raise KafkaUnavailable(f"describing consumer groups failed: {error}") from error
    return found


async def group_progress(
    settings: KafkaSettings, group: str, topic: str
) -> tuple[dict[int, int], dict[int, int]]:
    """End offsets of ``topic`` and ``group``'s committed offsets on it, by partition (a
    partition the group never committed is absent from the second). Raises ``KafkaUnavailable``
    when the broker does not answer."""
    try:
        async with offset_clients(settings) as (admin, consumer):
            tps = await topic_partitions(consumer, topic, timeout_s=10.0)
            # ends first: a record committed after this call only adds to what is processed
            end = await consumer.end_offsets(tps)
            committed = await committed_offsets(admin, group, tps)
    except (KafkaError, LookupError) as exc:
        raise KafkaUnavailable(f"reading the offsets of {topic} failed: {exc}") from exc
    return ({tp.partition: off for tp, off in end.items()},
            {tp.partition: off for tp, off in committed.items()})


async def ensure_topics(
    settings: KafkaSettings, topics: dict[str, tuple[int, dict[str, str]]],
    *, timeout_s: float = 60.0,
) -> None:
    """Create the given topics if missing (name -> (partitions, config)) and wait until every one
    is visible in a client's metadata. Those that exist are checked first
    (``cbtstream.topic_check``): a mismatch that would break the worker raises
    ``TopicsMismatch`` before anything is created or consumed.

    A Faust worker that starts before its topics are in the cluster metadata has its assignor
    ignore them ("Ignoring missing topic") and never consumes them until the next rebalance; the
    worker command calls this first so a worker started right after ``topics create`` works.
    """
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    try:
        await admin.start()
        await _create_checked(admin, settings, topics)
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot create topics: {exc}") from exc
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(**client_kwargs(settings), group_id=None)
    await consumer.start()
    try:
        for name in topics:
            await topic_partitions(consumer, name, timeout_s=timeout_s)
    except LookupError as exc:
        raise KafkaUnavailable(f"topic not visible after creation: {exc}") from exc
    finally:
        await consumer.stop()

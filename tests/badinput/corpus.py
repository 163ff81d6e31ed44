"""A seeded generator of malformed and hostile input records for every topic (issue 8, item 3).

Each record starts as a *valid* event of the topic's type and is mutated in one way (one
category). The generator states, independently of the product's code, what must become of it:

- ``DEAD``: undecodable for its topic (bad JSON, wrong type, missing/extra field, over a limit,
  key naming another disk, naive time, malformed UUID, wrong event type, tombstone, garbage):
  every consumer of the topic dead-letters it (the audit consumer only logs a bad record of the
  dead-letter topic itself, no loops);
- ``REFUSED``: a well-formed ``ChangeIdCommitted`` that does not continue its disk's lineage
  (another disk's change ID, a sync that is not running): the planner answers
  ``SyncFailed(lineage_mismatch)`` with id ``stable_event_id("SyncFailed", "lineage_mismatch",
  event_id)`` and applies nothing;
- ``FAILED``: a well-formed ``SnapshotTaken`` (planned, then refused by the copier) or
  ``SyncPlanned`` naming a path-like snapshot, a VM that does not exist, a snapshot that does not
  exist: the copier answers ``SyncFailed`` for the sync with one of ``reasons`` and writes nothing;
- ``IGNORED``: well-formed and harmless (a ``SyncFailed`` of no running sync, a
  ``SyncSuperseded`` for the copier, anything on an audit-only topic): stored by the audit
  consumer, changes nothing.

Well-formed hostile records never name a disk of the real VM with a snapshot that exists, so the
real VM's cycles must complete untouched. Every path-like string carries ``marker``, so a test can
look for any file it might have created. Lines for ``cbtstream publish`` come from the same
mutations of ``SnapshotTaken`` (``publish_lines``).
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from schemas.disk import DiskRef
from schemas.events import (
    ChangeIdCommitted,
    DeadLetter,
    FullReason,
    ReplicationType,
    SnapshotRemoved,
    SnapshotTaken,
    SyncFailed,
    SyncPlanned,
    SyncProgress,
    SyncSuperseded,
    stable_event_id,
)

PLANNER_TOPICS = ("cbt.snapshot.taken", "cbt.changeid.committed", "cbt.sync.failed")
COPIER_TOPICS = ("cbt.sync.planned",)
AUDIT_ONLY_TOPICS = ("cbt.sync.progress", "cbt.snapshot.removed", "cbt.deadletter")
TOPICS = (*PLANNER_TOPICS, *COPIER_TOPICS, *AUDIT_ONLY_TOPICS)
CATEGORIES = (
    "invalid_json", "wrong_types", "missing_fields", "extra_fields", "oversized",
    "key_body_mismatch", "foreign_change_id", "numbers", "path_like", "malformed_uuid",
    "naive_timestamp", "wrong_event_type", "tombstone", "binary_garbage",
)
#: A value over this is refused before parsing (``schemas.codec.MAX_VALUE_BYTES``), stated here
#: on its own so the corpus does not borrow the product's numbers.
ONE_MIB = 1024 * 1024
#: A VM snapshot the copier may pass to vSphere: a managed object id such as ``snapshot-42``.
_MOREF_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class Expect(StrEnum):
    DEAD = "dead_letter"
    REFUSED = "refused"
    FAILED = "failed"
    IGNORED = "ignored"


@dataclass(frozen=True)
class BadRecord:
    """One record to send raw to ``topic`` (base name) and what must become of it."""

    topic: str
    category: str
    kind: str
    key: bytes | None
    value: bytes | None
    expect: Expect
    #: FAILED: acceptable ``SyncFailed.reason`` values.
    reasons: frozenset[str] = frozenset()
    #: REFUSED: the planner's SyncFailed event id; FAILED: the sync id the copier fails.
    outcome_id: uuid.UUID | None = None
    #: The event id of a well-formed record (to find it in the audit trail).
    event_id: uuid.UUID | None = None

    @property
    def audit_may_refuse(self) -> bool:
        """PostgreSQL refuses NUL characters in text/jsonb and integers beyond bigint: such a
        well-formed event is dead-lettered by the audit consumer instead of stored."""
        v = self.value or b""
        return b"\\u0000" in v or any(len(t) > 18 for t in _digit_runs(v))


def _digit_runs(v: bytes) -> Iterator[bytes]:
    run = bytearray()
    for b in v:
        if 48 <= b <= 57:
            run.append(b)
        else:
            if run:
                yield bytes(run)
            run.clear()
    if run:
        yield bytes(run)


@dataclass
class Context:
    """What the generator knows about the run: the real VM (never given a snapshot that
    exists), its disks' change IDs once known, and the marker put into every path."""

    vm: str
    device_keys: tuple[int, ...]
    marker: str
    change_ids: dict[int, str] = field(default_factory=dict)


def path_values(marker: str) -> list[str]:
    """Path-like and look-alike strings; all but the classic ones name ``marker``."""
    m = marker
    return [
        "../../etc/passwd", "/etc/passwd", f"../../../../tmp/{m}-passwd", f"/tmp/{m}",
        f"{m}/../../../../../tmp/{m}-x", f"{m}\x00.img", f"..\\..\\{m}", f"C:\\{m}\\x.vmdk",
        f"~/{m}", f"file:///tmp/{m}", f"nbd://127.0.0.1:1/{m}", f"$(touch /tmp/{m})",
        f"`touch /tmp/{m}`", f"; touch /tmp/{m}", f"%2e%2e%2f%2e%2e%2ftmp%2f{m}", "..", ".", "/",
        f"{m}\u2215..\u2215..\u2215etc", f"\uff0e\uff0e\uff0f{m}", f"snapshot\u20101{m}",
        f"snapshot-1\u200b{m}", f"\u202e{m}", f"{m}\n\r\t", f"[ds] ../../{m}.vmdk",
        f"{m}-" + "n" * 90, f"{m}-" + "l" * 1000, f"{m}-" + "v" * 5000,
    ]


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _change_id(rng: random.Random, seq: int | None = None) -> str:
    epoch = " ".join(f"{rng.getrandbits(8):02x}" for _ in range(8)) + "-" + " ".join(
        f"{rng.getrandbits(8):02x}" for _ in range(8))
    return f"{epoch}/{rng.randint(1, 10**6) if seq is None else seq}"


def _time(rng: random.Random) -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 10**7))


# -- field kinds ------------------------------------------------------------------------------
# kind -> max length for free text (any string of that length is valid); None: structured.
FREE_TEXT = {"text": 1024, "text128": 128, "snap": 128, "reason64": 64, "detail": 4096,
             "digest": 200, "error": 8192, "any": None}
DISK_FIELDS = {"vm_instance_uuid": "vmuuid", "vm_path": "text", "vm_name": "text",
               "device_key": "int", "disk_id": "diskid", "backing_uuid": "text128",
               "backing_file": "text", "capacity_bytes": "int"}
COMMON_FIELDS = {"schema_version": "ver", "event_id": "uuid", "occurred_at": "time",
                 "event_type": "etype"}
EVENT_FIELDS: dict[str, dict[str, str]] = {
    "SnapshotTaken": {"vcenter": "text", "vm_snapshot": "snap", "snapshot_name": "text",
                      "change_id": "cid?", "taken_at": "time", "snapshot_device_keys": "keys?"},
    "SyncPlanned": {"sync_id": "uuid", "snapshot_event_id": "uuid", "vm_snapshot": "snap",
                    "replication_type": "rtype", "reason": "freason",
                    "previous_change_id": "cid?", "base_change_id": "cid?", "change_id": "cid?"},
    "SyncSuperseded": {"snapshot_event_id": "uuid", "vm_snapshot": "snap",
                       "superseded_by": "uuid"},
    "ChangeIdCommitted": {"sync_id": "uuid", "vm_snapshot": "snap", "previous_change_id": "cid?",
                          "change_id": "cid", "replication_type": "rtype", "reason": "freason",
                          "bytes_copied": "int", "bytes_zeroed": "int", "extents": "int",
                          "digest": "digest", "duration_s": "float"},
    "SyncFailed": {"sync_id": "uuid?", "vm_snapshot": "snap?", "reason": "reason64",
                   "detail": "detail", "retriable": "bool"},
    "SyncProgress": {"sync_id": "uuid", "bytes_done": "int", "bytes_total": "int",
                     "rate_bytes_per_s": "float"},
    "SnapshotRemoved": {"vm_snapshot": "snap"},
    "DeadLetter": {"original_topic": "any", "original_partition": "int",
                   "original_offset": "int", "original_key": "any?",
                   "original_key_encoding": "enc", "original_value": "any?",
                   "original_value_encoding": "enc", "error": "error", "stage": "any"},
}
#: Fields without a default (dropping one makes the event invalid).
REQUIRED = {
    "SnapshotTaken": ["disk", "vcenter", "vm_snapshot", "change_id", "taken_at", "event_type"],
    "SyncPlanned": ["disk", "sync_id", "snapshot_event_id", "vm_snapshot", "replication_type",
                    "reason", "previous_change_id", "base_change_id", "change_id"],
    "SyncSuperseded": ["disk", "snapshot_event_id", "vm_snapshot", "superseded_by"],
    "ChangeIdCommitted": ["disk", "sync_id", "vm_snapshot", "previous_change_id", "change_id",
                          "replication_type", "reason", "bytes_copied", "extents", "digest",
                          "duration_s"],
    "SyncFailed": ["disk", "reason", "event_type"],
    "SyncProgress": ["disk", "sync_id", "bytes_done", "bytes_total", "rate_bytes_per_s"],
    "SnapshotRemoved": ["disk", "vm_snapshot"],
    "DeadLetter": ["original_topic", "original_partition", "original_offset", "original_key",
                   "original_value", "error", "stage"],
}
DISK_REQUIRED = ["vm_instance_uuid", "vm_path", "vm_name", "device_key", "backing_file",
                 "capacity_bytes"]
#: Values no lax conversion turns into the field's type.
WRONG: dict[str, list[Any]] = {
    "text": [[], {"a": 1}, 12.5, False], "int": ["abc", [], {}, 2.5, "12abc"],
    "float": ["fast", [], {}], "uuid": [5, [], {}, "xyz", 1.5], "time": [[], {}, "yesterday"],
    "bool": ["maybe", [], {}, 7], "disk": [[], "disk", 5, None], "keys": ["1,2", {}, ["a"]],
}
BAD_UUIDS = ["", "not-a-uuid", "50d1e7e7-0000-4000-8000-00000000dea",
             "50d1e7e7-0000-4000-8000-00000000deadbeef", "zzzzzzzz-0000-4000-8000-000000000000",
             "50d1e7e7-0000-4000-8000-00000000dea\x00", "../../etc/passwd",
             "50d1e7e7 0000 4000 8000 00000000dead", "\uff41" * 32, "-" * 36]
NAIVE_TIMES = ["2026-01-01T12:00:00", "2026-01-01", "2026-01-01 12:00:00.5", "12:00:00",
               "2026-02-30T00:00:00Z", "", "2026-01-01T25:00:00+00:00"]


def _kind_of(etype: str, name: str) -> str:
    return {**COMMON_FIELDS, **EVENT_FIELDS[etype]}.get(name, "?")


def _valid_string(kind: str, value: str) -> bool:
    base = kind.rstrip("?")
    if base not in FREE_TEXT:
        return False
    limit = FREE_TEXT[base]
    if limit is not None and len(value) > limit:
        return False
    return not (base == "snap" and not value)


def _moref(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 128 and name[0] not in "-_" \
        and set(name) <= _MOREF_CHARS


class Generator:
    """Builds the corpus; every choice comes from ``random.Random(seed)``."""

    def __init__(self, seed: int, ctx: Context) -> None:
        self.rng = random.Random(seed)
        self.ctx = ctx
        self.paths = path_values(ctx.marker)
        self._n = 0

    # -- valid bases ----------------------------------------------------------------------------
    def disk(self, *, real: bool, device_key: int | None = None) -> dict[str, Any]:
        rng = self.rng
        vm = self.ctx.vm if real else str(_uuid(rng))
        key = device_key if device_key is not None else (
            rng.choice(self.ctx.device_keys) if real else rng.randint(2000, 2015))
        return {"vm_instance_uuid": vm, "vm_path": f"/DC/vm/hostile{self._n}",
                "vm_name": f"hostile{self._n}", "device_key": key, "disk_id": f"disk-{key}",
                "backing_uuid": f"6000C29{rng.getrandbits(32):08x}",
                "backing_file": f"[ds] hostile/hostile_{key}.vmdk",
                "capacity_bytes": rng.choice([1 << 20, 4 << 20, 1 << 30])}

    def hostile_snapshot(self) -> str:
        self._n += 1
        return f"snapshot-hostile{self._n}"

    def base(self, etype: str, topic: str) -> dict[str, Any]:
        """A valid event of ``etype`` for ``topic``, as a JSON document. Only a disk of the real
        VM where that is harmless: never with a snapshot that exists."""
        rng = self.rng
        self._n += 1
        real = topic in ("cbt.changeid.committed", "cbt.sync.failed", "cbt.sync.progress",
                         "cbt.snapshot.removed") or (topic == "cbt.sync.planned"
                                                     and rng.random() < 0.5)
        d = DiskRef.model_validate(self.disk(real=real))
        common: dict[str, Any] = {"event_id": _uuid(rng), "occurred_at": _time(rng)}
        ev: Any
        if etype == "SnapshotTaken":
            keys = (d.device_key,) if rng.random() < 0.3 else None
            ev = SnapshotTaken(disk=d, vcenter="vc.hostile", vm_snapshot=self.hostile_snapshot(),
                               change_id=_change_id(rng), taken_at=_time(rng),
                               snapshot_device_keys=keys, **common)
        elif etype == "SyncPlanned":
            full = rng.random() < 0.5
            ev = SyncPlanned(disk=d, sync_id=_uuid(rng), snapshot_event_id=_uuid(rng),
                             vm_snapshot=self.hostile_snapshot(),
                             replication_type=ReplicationType.FULL if full
                             else ReplicationType.INCREMENTAL,
                             reason=FullReason.NO_PREVIOUS_COMMIT if full
                             else FullReason.PREVIOUS_COMMIT,
                             previous_change_id=None if full else _change_id(rng),
                             base_change_id=None if full else _change_id(rng),
                             change_id=_change_id(rng), **common)
        elif etype == "SyncSuperseded":
            ev = SyncSuperseded(disk=d, snapshot_event_id=_uuid(rng),
                                vm_snapshot=self.hostile_snapshot(), superseded_by=_uuid(rng),
                                **common)
        elif etype == "ChangeIdCommitted":
            ev = ChangeIdCommitted(disk=d, sync_id=_uuid(rng), vm_snapshot=self.hostile_snapshot(),
                                   previous_change_id=_change_id(rng), change_id=_change_id(rng),
                                   replication_type=ReplicationType.INCREMENTAL,
                                   reason=FullReason.PREVIOUS_COMMIT,
                                   bytes_copied=4096, extents=1, digest="sha256:" + "0" * 64,
                                   duration_s=0.5, **common)
        elif etype == "SyncFailed":
            ev = SyncFailed(disk=d, sync_id=_uuid(rng), vm_snapshot=self.hostile_snapshot(),
                            reason="hostile", detail="forged", **common)
        elif etype == "SyncProgress":
            ev = SyncProgress(disk=d, sync_id=_uuid(rng), bytes_done=1, bytes_total=2,
                              rate_bytes_per_s=1.0, **common)
        elif etype == "SnapshotRemoved":
            ev = SnapshotRemoved(disk=d, vm_snapshot=self.hostile_snapshot(), **common)
        else:
            ev = DeadLetter(original_topic="cbt.snapshot.taken", original_partition=0,
                            original_offset=rng.randint(0, 1000), original_key="k",
                            original_value="v", error="forged", stage="planner", **common)
        doc: dict[str, Any] = json.loads(ev.model_dump_json())
        return doc

    # -- outcome of a well-formed record ---------------------------------------------------------
    def record(self, topic: str, category: str, kind: str, doc: Any, *,
               key: bytes | str | None = "auto", value: bytes | str | None = "auto",
               dead: bool) -> BadRecord:
        """Encode ``doc`` and state the expectation (``dead``: undecodable by construction)."""
        if value == "auto":
            value = json.dumps(doc, ensure_ascii=self.rng.random() < 0.5).encode(
                errors="surrogatepass")
        if key == "auto":
            key = _key_of(doc)
        assert not isinstance(key, str) and not isinstance(value, str)
        if dead:
            return BadRecord(topic, category, kind, key, value, Expect.DEAD)
        etype = doc["event_type"]
        eid = uuid.UUID(doc["event_id"]) if "event_id" in doc else None
        if topic == "cbt.changeid.committed":
            assert eid is not None
            return BadRecord(topic, category, kind, key, value, Expect.REFUSED,
                             frozenset({"lineage_mismatch"}),
                             stable_event_id("SyncFailed", "lineage_mismatch", eid), eid)
        if topic == "cbt.snapshot.taken":
            assert eid is not None
            return BadRecord(topic, category, kind, key, value, Expect.FAILED,
                             self._copier_reasons(doc), stable_event_id("sync", eid), eid)
        if topic == "cbt.sync.planned" and etype == "SyncPlanned":
            # A forged plan for a disk whose replica exists carries no newer generation than
            # the replica holds: the replica guard refuses it as stale before anything else.
            return BadRecord(topic, category, kind, key, value, Expect.FAILED,
                             self._copier_reasons(doc) | {"stale_plan"},
                             uuid.UUID(doc["sync_id"]), eid)
        return BadRecord(topic, category, kind, key, value, Expect.IGNORED, event_id=eid)

    def _copier_reasons(self, doc: dict[str, Any]) -> frozenset[str]:
        if not _moref(doc.get("vm_snapshot")):
            return frozenset({"not_allowed"})
        # A VM that does not exist, or a snapshot of the real VM that does not exist (vSphere
        # says so; for a disk of capacity 0 no area is queried and the export is not found).
        return frozenset({"not_found", "export_not_found"})

    # -- categories ----------------------------------------------------------------------------
    def generate(self, topic: str, etypes: tuple[str, ...], per_category: int
                 ) -> list[BadRecord]:
        out: list[BadRecord] = []
        makers: dict[str, Callable[[str, str], list[BadRecord]]] = {
            c: getattr(self, f"_c_{c}") for c in CATEGORIES}
        for category in CATEGORIES:
            for i in range(per_category):
                etype = etypes[i % len(etypes)]
                out += makers[category](topic, etype)
        return out

    def path_snapshots(self, topic: str) -> list[BadRecord]:
        """Every path-like string that fits ``vm_snapshot`` (1-128 characters), in a well-formed
        snapshot (another VM's disk) or plan (a disk of the real VM): the copier must refuse it
        before any vSphere or NBD call."""
        etype = TOPIC_TYPES[topic][0]
        out = []
        for value in self.paths:
            if not 0 < len(value) <= 128:
                continue
            doc = self.base(etype, topic)
            doc["vm_snapshot"] = value
            out.append(self.record(topic, "path_like", f"vm_snapshot={value[:30]!r}", doc,
                                   dead=False))
        return out

    def _c_invalid_json(self, topic: str, etype: str) -> list[BadRecord]:
        doc = self.base(etype, topic)
        text = json.dumps(doc)
        rng = self.rng
        cut = rng.randint(1, len(text) - 2)
        variants = [text[:cut], text + "}", text.replace('"', "'", 3), text[:-1] + ",}",
                    '{"event_type": NaN ' + text[1:], "[" * 50_000 + "]" * 50_000,
                    '{"event_type": "' + etype + '", "n": ' + "7" * 5000 + "}",
                    text.replace(":", "=", 1), text[: cut] + "\x00" + text[cut:]]
        v = rng.choice(variants)
        return [self.record(topic, "invalid_json", "truncated/garbled JSON", doc,
                            value=v.encode(), dead=True)]

    def _c_wrong_types(self, topic: str, etype: str) -> list[BadRecord]:
        doc = self.base(etype, topic)
        rng = self.rng
        if rng.random() < 0.3 and "disk" in doc:
            name = rng.choice(["device_key", "capacity_bytes", "vm_path", "vm_name",
                               "backing_file"])
            kind, key = DISK_FIELDS[name], _key_of(doc)
            doc["disk"][name] = rng.choice(WRONG["int" if kind == "int" else "text"])
            return [self.record(topic, "wrong_types", f"disk.{name}", doc, key=key, dead=True)]
        fields = {n: k for n, k in EVENT_FIELDS[etype].items()}
        name = rng.choice([*fields, "disk", "event_id", "occurred_at"])
        k = "disk" if name == "disk" else _kind_of(etype, name).rstrip("?")
        pool = WRONG.get({"snap": "text", "text128": "text", "reason64": "text",
                          "detail": "text", "digest": "text", "error": "text", "any": "text",
                          "cid": "text", "rtype": "text", "freason": "text", "enc": "text",
                          "keys": "keys"}.get(k, k), WRONG["text"])
        doc[name] = rng.choice(pool)
        return [self.record(topic, "wrong_types", name, doc, dead=True)]

    def _c_missing_fields(self, topic: str, etype: str) -> list[BadRecord]:
        doc = self.base(etype, topic)
        rng = self.rng
        if "disk" in doc and rng.random() < 0.3:
            name = rng.choice(DISK_REQUIRED)
            key = _key_of(doc)
            del doc["disk"][name]
            return [self.record(topic, "missing_fields", f"disk.{name}", doc, key=key,
                                dead=True)]
        name = rng.choice(REQUIRED[etype])
        key = _key_of(doc)
        del doc[name]
        return [self.record(topic, "missing_fields", name, doc, key=key, dead=True)]

    def _c_extra_fields(self, topic: str, etype: str) -> list[BadRecord]:
        doc = self.base(etype, topic)
        rng = self.rng
        name = rng.choice(["extra", "__proto__", "$where", "target_path", "nbd_uri", "Disk"])
        value = rng.choice([1, "x", {"path": self.rng.choice(self.paths)}, None])
        where = doc["disk"] if "disk" in doc and rng.random() < 0.4 else doc
        where[name] = value
        return [self.record(topic, "extra_fields", name, doc, dead=True)]

    def _c_oversized(self, topic: str, etype: str) -> list[BadRecord]:
        doc = self.base(etype, topic)
        rng = self.rng
        if self._n % 9 == 0:  # a few values over 1 MiB (each costs a big dead letter)
            doc["padding"] = "p" * (ONE_MIB + rng.randint(1, 1000))
            return [self.record(topic, "oversized", "value over 1 MiB", doc, dead=True)]
        limits = {n: FREE_TEXT[k.rstrip("?")] for n, k in EVENT_FIELDS[etype].items()
                  if k.rstrip("?") in FREE_TEXT and FREE_TEXT[k.rstrip("?")]}
        if "disk" in doc and (not limits or rng.random() < 0.4):
            name = rng.choice(["vm_path", "vm_name", "backing_file", "backing_uuid"])
            n = 129 if name == "backing_uuid" else 1025
            doc["disk"][name] = "o" * (n + rng.randint(0, 50_000))
            return [self.record(topic, "oversized", f"disk.{name} over its limit", doc,
                                dead=True)]
        name = rng.choice(sorted(limits))
        doc[name] = "o" * (int(limits[name] or 0) + 1 + rng.randint(0, 50_000))
        return [self.record(topic, "oversized", f"{name} over its limit", doc, dead=True)]

    def _c_key_body_mismatch(self, topic: str, etype: str) -> list[BadRecord]:
        if topic == "cbt.deadletter":  # keyed by the original record's key: any key is fine
            return self._c_tombstone(topic, etype)
        doc = self.base(etype, topic)
        rng = self.rng
        vm, k = doc["disk"]["vm_instance_uuid"], doc["disk"]["device_key"]
        other = self.ctx.device_keys[0] if k != self.ctx.device_keys[0] else k + 1
        keys = [f"{vm}/disk-{k + 1}", f"{vm}/disk-{other}", f"{_uuid(rng)}/disk-{k}",
                f"{self.ctx.vm}/disk-{k}" if vm != self.ctx.vm else f"{_uuid(rng)}/disk-{k}",
                "", f"{vm.upper() if vm.upper() != vm else 'F' + vm[1:]}/disk-{k}",
                f"{vm}/disk-{k}\n", f"{vm}/disk-{k}\x00",
                f"{vm}/../disk-{k}", f"{vm}/disk-0{k}", f"{vm}/{rng.choice(self.paths)}"]
        key = rng.choice(keys).encode(errors="surrogatepass")
        return [self.record(topic, "key_body_mismatch", "key names another disk", doc,
                            key=key if rng.random() < 0.95 else None, dead=True)]

    def _c_foreign_change_id(self, topic: str, etype: str) -> list[BadRecord]:
        """Another disk's change ID in a well-formed event (the bug this project exists for)."""
        rng = self.rng
        doc = self.base(etype, topic)
        keys = self.ctx.device_keys
        mine = doc["disk"]["device_key"] if "disk" in doc else keys[0]
        others = [k for k in keys if k != mine] or list(keys)
        foreign = self.ctx.change_ids.get(rng.choice(others)) or _change_id(rng, 3)
        if etype == "ChangeIdCommitted":
            doc["previous_change_id"] = foreign
            doc["change_id"] = foreign.rsplit("/", 1)[0] + "/" + str(int(
                foreign.rsplit("/", 1)[1]) + 1)
            if rng.random() < 0.3:
                doc["previous_change_id"] = None
                doc["replication_type"], doc["reason"] = "full", "no_previous_commit"
        elif etype == "SyncPlanned":
            doc["base_change_id"] = doc["previous_change_id"] = foreign
            doc["replication_type"], doc["reason"] = "incremental", "previous_commit"
        elif etype == "SnapshotTaken":
            doc["change_id"] = foreign
        elif etype == "SyncFailed":
            doc["detail"] = f"previous change ID {foreign}"
        elif etype == "DeadLetter":
            doc["original_value"] = json.dumps({"change_id": foreign})
        else:  # no change ID field: key the event by another disk of the real VM instead
            doc["disk"]["device_key"] = rng.choice(others)
            doc["disk"]["disk_id"] = f"disk-{doc['disk']['device_key']}"
        return [self.record(topic, "foreign_change_id", f"{etype} with another disk's change ID",
                            doc, dead=False)]

    def _c_numbers(self, topic: str, etype: str) -> list[BadRecord]:
        rng = self.rng
        doc = self.base(etype, topic)
        huge = [10**30, 2**63, 2**64 + 1, 10**200]
        choices: list[tuple[str, Any, bool]] = []  # (field, value, dead)
        if "disk" in doc:
            choices += [("disk.device_key", v, True) for v in (-1, -2000, 10**9, *huge)]
            choices += [("disk.capacity_bytes", v, True) for v in (-1, (1 << 50) + 1, *huge)]
            choices += [("disk.capacity_bytes", 0, False)]
        if etype == "SnapshotTaken":
            choices += [("snapshot_device_keys", [-1], False), ("snapshot_device_keys",
                        list(range(300)), True), ("change_id", _change_id(rng, -1), True),
                        ("change_id", _change_id(rng, 10**40), False)]
        if etype == "ChangeIdCommitted":
            choices += [(f, -1, True) for f in ("bytes_copied", "bytes_zeroed", "extents",
                                                 "duration_s")]
            choices += [(f, v, False) for f in ("bytes_copied", "extents") for v in huge[:2]]
            choices += [("duration_s", 1e308, False)]
        if etype == "SyncProgress":
            choices += [("bytes_done", -1, True), ("rate_bytes_per_s", -0.5, True),
                        ("bytes_total", 10**30, False), ("bytes_done", 2**63, False)]
        if etype == "DeadLetter":
            choices += [("original_offset", -1, False), ("original_partition", 2**40, False)]
        choices += [("schema_version", v, True) for v in (0, 2, -1, 10**9)]
        name, value, dead = rng.choice(choices)
        if name.startswith("disk."):
            key = _key_of(doc)
            doc["disk"][name[5:]] = value
            if name == "disk.device_key" and isinstance(value, int):
                doc["disk"]["disk_id"] = f"disk-{value}"
            return [self.record(topic, "numbers", f"{name}={str(value)[:20]}", doc, key=key,
                                dead=dead)]
        doc[name] = value
        return [self.record(topic, "numbers", f"{name}={str(value)[:20]}", doc, dead=dead)]

    def _c_path_like(self, topic: str, etype: str) -> list[BadRecord]:
        """A path-like string in one string field (every string field over the corpus)."""
        rng = self.rng
        doc = self.base(etype, topic)
        fields = [(n, k) for n, k in {**COMMON_FIELDS, **EVENT_FIELDS[etype]}.items()
                  if k.rstrip("?") not in ("int", "float", "bool", "keys", "ver")]
        if "disk" in doc:
            fields += [(f"disk.{n}", k) for n, k in DISK_FIELDS.items() if k != "int"]
        free = [(n, k) for n, k in fields if k.rstrip("?") in FREE_TEXT]
        name, kind = rng.choice(free if free and rng.random() < 0.6 else fields)
        value = rng.choice(self.paths)
        dead = not _valid_string(kind, value)
        key = _key_of(doc)
        if name.startswith("disk."):
            doc["disk"][name[5:]] = value
        else:
            doc[name] = value
        if etype == "DeadLetter" and name in ("original_key_encoding", "original_value_encoding"):
            dead = True
        return [self.record(topic, "path_like", f"{name}={value[:30]!r}", doc, key=key,
                            dead=dead)]

    def _c_malformed_uuid(self, topic: str, etype: str) -> list[BadRecord]:
        rng = self.rng
        doc = self.base(etype, topic)
        key = _key_of(doc)
        names = [n for n, k in {**COMMON_FIELDS, **EVENT_FIELDS[etype]}.items()
                 if k.rstrip("?") == "uuid"]
        bad = rng.choice(BAD_UUIDS)
        if "disk" in doc and (rng.random() < 0.4 or not names):
            doc["disk"]["vm_instance_uuid"] = bad
            return [self.record(topic, "malformed_uuid", "disk.vm_instance_uuid", doc,
                                key=key if rng.random() < 0.5 else
                                f"{bad}/disk-{doc['disk']['device_key']}".encode(
                                    errors="surrogatepass"), dead=True)]
        name = rng.choice(names)
        doc[name] = bad
        return [self.record(topic, "malformed_uuid", name, doc, key=key, dead=True)]

    def _c_naive_timestamp(self, topic: str, etype: str) -> list[BadRecord]:
        rng = self.rng
        doc = self.base(etype, topic)
        names = ["occurred_at"] + (["taken_at"] if etype == "SnapshotTaken" else [])
        name = rng.choice(names)
        doc[name] = rng.choice(NAIVE_TIMES)
        return [self.record(topic, "naive_timestamp", name, doc, dead=True)]

    def _c_wrong_event_type(self, topic: str, etype: str) -> list[BadRecord]:
        rng = self.rng
        allowed = TOPIC_TYPES[topic]
        others = [t for t in EVENT_FIELDS if t not in allowed]
        if rng.random() < 0.6:
            doc = self.base(rng.choice(others), topic)
            return [self.record(topic, "wrong_event_type", f"{doc['event_type']} on {topic}",
                                doc, dead=True)]
        doc = self.base(etype, topic)
        doc["event_type"] = rng.choice([etype.lower(), etype + " ", "DeadLetter", None, 5, [],
                                        {"t": etype}, "", "SnapshotDeleted", "../" + etype])
        if etype == "DeadLetter" and doc["event_type"] == "DeadLetter":
            doc["event_type"] = "Deadletter"
        return [self.record(topic, "wrong_event_type", f"event_type={doc['event_type']!r}",
                            doc, dead=True)]

    def _c_tombstone(self, topic: str, etype: str) -> list[BadRecord]:
        doc = self.base(etype, topic)
        key = _key_of(doc) if self.rng.random() < 0.7 else b""  # (a null key needs a value)
        return [self.record(topic, "tombstone", "null value", doc, key=key, value=None,
                            dead=True)]

    def _c_binary_garbage(self, topic: str, etype: str) -> list[BadRecord]:
        rng = self.rng
        doc = self.base(etype, topic)
        n = rng.choice([1, 7, 64, 1000, 20_000])
        garbage = bytes(rng.getrandbits(8) for _ in range(n))
        variants = [garbage, b"\xff\xfe" + garbage, b"\x00" * n, b'{"event_type": "\xff\xfe"}',
                    json.dumps(doc).encode()[:-1] + b"\xc3\x28}"]
        key = rng.choice([_key_of(doc), garbage[:16], None])
        return [self.record(topic, "binary_garbage", f"{n} random bytes", doc, key=key,
                            value=rng.choice(variants), dead=True)]


TOPIC_TYPES: dict[str, tuple[str, ...]] = {
    "cbt.snapshot.taken": ("SnapshotTaken",),
    "cbt.changeid.committed": ("ChangeIdCommitted",),
    "cbt.sync.failed": ("SyncFailed",),
    "cbt.sync.planned": ("SyncPlanned", "SyncSuperseded"),
    "cbt.sync.progress": ("SyncProgress",),
    "cbt.snapshot.removed": ("SnapshotRemoved",),
    "cbt.deadletter": ("DeadLetter",),
}


def _key_of(doc: Any) -> bytes | None:
    try:
        d = doc["disk"]
        return f"{d['vm_instance_uuid']}/disk-{d['device_key']}".encode(errors="surrogatepass")
    except (KeyError, TypeError):
        return b"no-disk"


def corpus(seed: int, ctx: Context, per_category: int = 3,
           topics: tuple[str, ...] = TOPICS) -> list[BadRecord]:
    """``per_category`` records of every category for every topic, in a seeded shuffled order."""
    gen = Generator(seed, ctx)
    out: list[BadRecord] = []
    for topic in topics:
        out += gen.generate(topic, TOPIC_TYPES[topic], per_category)
        if topic in ("cbt.snapshot.taken", "cbt.sync.planned"):
            out += gen.path_snapshots(topic)
    gen.rng.shuffle(out)
    return out


def publish_lines(seed: int, ctx: Context, per_category: int = 3) -> list[BadRecord]:
    """``SnapshotTaken`` mutations as JSON lines for ``cbtstream publish`` (one line each: no
    tombstones, and no raw ``\\n``/``\\r`` inside a line). ``DEAD``: the line is rejected."""
    gen = Generator(seed, ctx)
    lines = []
    for r in gen.generate("cbt.snapshot.taken", ("SnapshotTaken",), per_category):
        if r.value is None or r.category == "key_body_mismatch" or r.kind == "event_type":
            # publish derives the key from the body, a null line is just blank, and a line
            # without event_type is a SnapshotTaken by definition
            continue
        if b"\n" in r.value or b"\r" in r.value or not r.value.strip():
            continue
        lines.append(r)
    return lines


def summary(records: list[BadRecord]) -> dict[str, dict[str, int]]:
    """Counts per topic and per category (and per expectation), for the report."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        for k in (f"topic:{r.topic}", f"category:{r.category}", f"expect:{r.expect}"):
            group, _, name = k.partition(":")
            out.setdefault(group, {})[name] = out.setdefault(group, {}).get(name, 0) + 1
    return out

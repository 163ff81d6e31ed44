"""Executes a plan against vSphere and NBD: changed areas from ``QueryChangedDiskAreas``, blocks
from the snapshot's NBD export, written by the copy engine to the disk's replica.

Before anything is read or written, the replica guard (``consumers/replica``) fences stale plans
and turns an incremental into a full copy when the replica does not provably hold its base.

The fallback ladder, for this disk only, each step recorded in the result's ``reason``:

0. the replica guard: full with ``replica_*`` when the replica is missing, replaced, of unknown
   state, mismatched or not at the plan's base;
1. incremental: the changed areas since the plan's base change ID (the disk's own last commit);
2. if vSphere rejects that change ID (stale, foreign, CBT reset, CBT off, malformed): full copy of
   the allocated areas (``changeId="*"``), reason ``base_change_id_rejected``;
3. if vSphere cannot list the allocated areas either: full copy of the whole disk, reason
   ``allocated_areas_failed``.

A full copy also zeroes the replica outside the allocated areas, so an existing replica cannot
keep stale blocks. Errors that say nothing about the change ID (snapshot gone, vCenter
unreachable) are raised, never turned into a full copy: the copier retries transient ones and
publishes ``SyncFailed`` for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from cbtstream.config import Settings
from cbtstream.extents import Extent
from cbtstream.threads import opened_in_thread
from cbtstream.tls import nbd_tls_context
from cbtstream.vsphere.adapter import VmRef, VSphereClient
from cbtstream.vsphere.errors import (
    CbtNotEnabled,
    StaleChangeId,
    VSphereError,
    VSphereInvalidArgument,
    VSphereNotFound,
)
from consumers.copy.digest import HashTree
from consumers.copy.engine import CopyOptions, CopyResult, copy_disk
from consumers.copy.progress import CopyProgress
from consumers.copy.sources import BlockSource, open_nbd_source
from consumers.copy.targets import BlockTarget, FileTarget, NbdTarget, TargetError
from consumers.executor import ProgressCallback, ProgressUpdate, SyncResult
from consumers.exports import ExportResolver
from consumers.points.saving import SavingTarget
from consumers.replica.guard import Admission
from consumers.replica.location import ReplicaLocation, TargetResolver
from consumers.replica.points import SyncPoints, chain_of
from consumers.replica.session import (
    OutcomeAlreadyPublished,
    ReplicaSession,
    copier_host,
    pipeline_name,
)
from consumers.replica.state import TargetKind
from consumers.replica.store import ReplicaBusy
from schemas.events import FullReason, ReplicationType, SyncPlanned

log = logging.getLogger("cbtstream.copier.vsphere")

#: vSphere's answers that mean "this change ID cannot be used": fall back to a full copy.
_REJECTED = (StaleChangeId, CbtNotEnabled, VSphereInvalidArgument)


def complement(extents: Sequence[Extent], capacity: int) -> list[Extent]:
    """The parts of ``[0, capacity)`` not covered by ``extents`` (any order, may overlap)."""
    gaps: list[Extent] = []
    pos = 0
    for e in sorted(extents):
        if e.start > pos:
            gaps.append(Extent(pos, e.start - pos))
        pos = max(pos, e.end)
    if pos < capacity:
        gaps.append(Extent(pos, capacity - pos))
    return [g for g in gaps if g.start < capacity]


class VSphereExecutor:
    """A :class:`consumers.executor.SyncExecutor` for VMware snapshots."""

    guards_replicas = True

    def __init__(self, settings: Settings, client: VSphereClient, exports: ExportResolver) -> None:
        self.settings = settings
        self.client = client
        self.exports = exports
        self.targets = TargetResolver(settings.copier)
        self.pipeline = pipeline_name(settings.kafka.topic_prefix, settings.streams.app_id)
        self.here = copier_host(settings.copier)
        self._vms: dict[str, VmRef] = {}

    async def _vm(self, instance_uuid: str) -> VmRef:
        if instance_uuid not in self._vms:
            self._vms[instance_uuid] = await self.client.find_vm(instance_uuid=instance_uuid)
        return self._vms[instance_uuid]

    async def _areas(self, vm: VmRef, plan: SyncPlanned, change_id: str) -> list[Extent]:
        areas = self.client.changed_areas(
            vm, plan.vm_snapshot, plan.disk.device_key, change_id, plan.disk.capacity_bytes
        )
        return [e async for e in areas]

    async def changed_extents(
        self, vm: VmRef, plan: SyncPlanned, admission: Admission
    ) -> tuple[ReplicationType, FullReason, list[Extent], bool]:
        """Walk the ladder from what the replica guard admitted: (type, reason, extents to
        copy, zero the rest of the replica?)."""
        capacity = plan.disk.capacity_bytes
        reason = admission.reason
        base = admission.base_change_id or plan.base_change_id
        if admission.replication_type == ReplicationType.INCREMENTAL and base:
            try:
                extents = await self._areas(vm, plan, base)
                return ReplicationType.INCREMENTAL, reason, extents, False
            except _REJECTED as exc:
                log.warning(
                    "base change ID rejected, falling back to full copy",
                    extra={"base_change_id": base, "error": str(exc)},
                )
                reason = FullReason.BASE_CHANGE_ID_REJECTED
        try:
            allocated = await self._areas(vm, plan, "*")
        except VSphereNotFound:
            raise
        except VSphereError as exc:
            if exc.retriable:
                raise
            log.warning(
                "allocated areas unavailable, copying the whole disk", extra={"error": str(exc)}
            )
            return (
                ReplicationType.FULL,
                FullReason.ALLOCATED_AREAS_FAILED,
                [Extent(0, capacity)],
                False,
            )
        return ReplicationType.FULL, reason, allocated, True

    async def execute(self, plan: SyncPlanned, progress: ProgressCallback, *,
                      outcome_published: bool = False) -> SyncResult:
        """The order of effects of ``consumers/replica/session.py`` around the copy.

        The replica's placement is resolved once here and handed to every step that needs it
        (both admissions, the opener, the identity)."""
        capacity = plan.disk.capacity_bytes
        loc = self.targets.locate(plan.disk.key)
        async with contextlib.AsyncExitStack() as stack:
            nbd_target: NbdTarget | None = None
            nbd_identity = None
            if loc.kind == TargetKind.NBD:
                nbd_target = await stack.enter_async_context(self._nbd_target(loc, capacity))
                nbd_identity = loc.nbd_identity(nbd_target)
            session = await ReplicaSession.begin(loc, plan, self.pipeline, self.here,
                                                 nbd_identity)
            held = session.already_applied
            if held is not None:
                log.info("plan redelivered; the replica already holds it: same outcome again",
                         extra={"sync_id": str(plan.sync_id)})
                return held
            if outcome_published:
                raise OutcomeAlreadyPublished(
                    f"the outcome of sync {plan.sync_id} was published and the replica record "
                    "does not show it applied: not writing it again")
            vm = await self._vm(plan.disk.vm_instance_uuid)
            rtype, reason, extents, zero_rest = await self.changed_extents(
                vm, plan, session.admission)
            # The export is held until the sync ends or is cancelled (a VDDK export is an
            # nbdkit process, stopped when the stack unwinds).
            export = await stack.enter_async_context(
                self.exports.export(plan.disk, plan.vm_snapshot))
            # Only now, with the VM, snapshot and export known to exist (so a forged plan leaves
            # no file behind), take the replica's lock and admit the plan again under it: a
            # verify or another copier may have changed the record meanwhile.
            await stack.enter_async_context(loc.store.lock())
            again = await ReplicaSession.begin(loc, plan, self.pipeline, self.here, nbd_identity)
            if again.admission != session.admission or again.already_applied is not None:
                raise ReplicaBusy(f"the record of {plan.disk.key} changed while the sync was "
                                  "being prepared; retrying")
            session = again
            stack.callback(session.close)
            if nbd_target is not None:
                target: BlockTarget = nbd_target
                identity = nbd_identity
            else:
                # a cancel during the open (a rebalance) must not leave the file locked
                opened = await opened_in_thread(self.targets.open, loc, capacity,
                                                close=_close_target)
                assert isinstance(opened, FileTarget)
                target = await stack.enter_async_context(opened)
                identity = await asyncio.to_thread(loc.identity)
            assert identity is not None
            # A version 1 tree is converted before the source is connected: reading the whole
            # replica can take long, and a VDDK session is only opened by a connection.
            if session.legacy is not None and not await session.convert(target.read_into):
                # the replica differs from its record: full, like after a verify mismatch
                rtype, reason, extents, zero_rest = await self.changed_extents(
                    vm, plan, session.admission)
            source = await stack.enter_async_context(open_nbd_source(
                export.uri,
                self.settings.copier.nbd_allow,
                connections=export.connections(self.settings.copier.nbd_connections),
                tls_context=nbd_tls_context(self.settings.copier),
            ))
            points = await self._begin_points(plan, loc, session)
            if points is not None:
                stack.callback(points.close)
                if points.writer is not None:
                    # every write of the sync saves the old bytes first (restore points)
                    target = SavingTarget(target, points.writer)
            await session.mark_dirty(rtype, identity)
            tree = await session.base_tree(rtype, capacity)
            result = await self._copy(plan, loc, source, target, rtype, extents, zero_rest,
                                      tree, progress)
            if result.leaves_repaired and rtype == ReplicationType.INCREMENTAL:
                # leaves it rewrote in part were corrupt: repaired from the snapshot, reported
                # under verify's word (consumers/copy/engine.py, "Edge leaves")
                reason = FullReason.REPLICA_MISMATCH
            synced = SyncResult(
                replication_type=rtype,
                reason=reason,
                bytes_copied=result.bytes_copied,
                bytes_zeroed=result.bytes_zeroed,
                extents=result.extents,
                digest=result.digest,
                duration_s=round(result.duration_s, 6),
                bytes_read=result.bytes_read,
                bytes_changed=result.bytes_changed,
            )
            assert result.tree is not None
            done = await session.mark_clean(synced, result.tree, identity)
            if points is not None:
                assert session.state is not None
                await points.commit(plan, session.state)
            return done
        raise AssertionError("unreachable")  # pragma: no cover

    async def _begin_points(self, plan: SyncPlanned, loc: ReplicaLocation,
                            session: ReplicaSession) -> SyncPoints | None:
        """Restore points, when ``[points]`` keeps history (before "mark dirty", under the
        lock): the sync is the pending point (``consumers/replica/points.py``). None with
        the default policy (no history: nothing saved, today's path)."""
        policy = self.settings.points
        if not policy.keeps_history:
            return None
        points = SyncPoints(chain_of(loc.store, plan.disk.key, plan.disk.capacity_bytes),
                            policy)
        await points.begin(plan, session.record if session.state is None else session.state)
        return points

    def _nbd_target(self, loc: ReplicaLocation, capacity: int) -> NbdTarget:
        target = self.targets.open(loc, capacity, tls_context=nbd_tls_context(
            self.settings.copier))
        assert isinstance(target, NbdTarget)
        return target

    async def _copy(self, plan: SyncPlanned, loc: ReplicaLocation, source: BlockSource,
                    target: BlockTarget, rtype: ReplicationType, extents: list[Extent],
                    zero_rest: bool, tree: HashTree, progress: ProgressCallback) -> CopyResult:
        capacity = plan.disk.capacity_bytes
        if target.size < capacity:
            raise TargetError(f"target of {plan.disk.key} has {target.size} bytes, the disk "
                              f"{capacity}")
        options = CopyOptions.from_settings(
            self.settings.copier,
            disk_key=plan.disk.key,
            verify=self.settings.copier.verify,
            checkpoint_interval_bytes=self.settings.copier.checkpoint_bytes,
        )

        def on_progress(p: CopyProgress) -> None:
            progress(ProgressUpdate(p.bytes_done, p.bytes_total))

        if zero_rest:
            for gap in complement(extents, capacity):
                await target.zero(gap.start, gap.length)
        result = await copy_disk(
            source,
            target,
            extents,
            capacity=capacity,
            options=options,
            checkpoint=loc.store.checkpoint(plan.disk.key, str(plan.sync_id)),
            on_progress=on_progress,
            tree=tree,
        )
        log.info(
            "copied",
            extra={
                "replication_type": rtype,
                "bytes_copied": result.bytes_copied,
                "bytes_zeroed": result.bytes_zeroed,
                "extents": result.extents,
                "resumed_from": result.resumed_from,
                "replica_digest": result.replica_digest,
            },
        )
        return result

    async def release(self, plan: SyncPlanned) -> None:
        """The outcome is published: the resume checkpoint (beside the replica's record) is no
        longer needed."""
        store = self.targets.locate(plan.disk.key).store
        await asyncio.to_thread(store.checkpoint(plan.disk.key, str(plan.sync_id)).done)


async def build_vsphere_executor(settings: Settings) -> VSphereExecutor:
    """The production composition: a connected vSphere client and the configured exports,
    started (a VDDK plugin that does not load stops the copier here, with the reason)."""
    from consumers.exports import build_exports

    client = VSphereClient(settings.vsphere)
    await client.start()
    exports = build_exports(settings, client)
    try:
        await exports.start()
    except BaseException:
        await client.stop()
        raise
    return VSphereExecutor(settings, client, exports)


def _close_target(target: object) -> None:
    """Close a replica target a cancelled sync opened (its lock goes with it)."""
    if isinstance(target, FileTarget):
        target.close()

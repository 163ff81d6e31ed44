"""One sync's effects on one replica, in order::

    load record -> admit (guard.py: host, fence, base check) -> [refuse: StalePlan or
    ReplicaOnOtherHost, nothing written]
    -> [a version 1 tree: convert it, proving the replica (convert.py)]
    -> [restore points kept: the sync becomes the pending point (points.py)] -> mark dirty (durable)
    -> open the base tree's leaves (an interrupted sync's journal put back) -> journal the
    entries this sync rewrites -> write ([points: each write's old bytes saved first, durably])
    -> flush -> save leaves and pieces -> mark clean at the new change ID (durable) -> [points:
    commit, prune] -> [the copier publishes the commit] -> drop the journal, prune old trees

A crash before "mark dirty" leaves the replica as it was; after it and before "mark clean", the
record says dirty with this sync: only the same sync (a resume) or a full copy may write next,
and nothing is committed. The record is clean at the new change ID before the commit is
published, so a replica never lags behind a published commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from cbtstream.config import CopierSettings
from cbtstream.errors import CbtStreamError
from cbtstream.threads import opened_in_thread
from consumers.copy.digest import HashTree
from consumers.copy.digest_v1 import V1Tree
from consumers.copy.leaves import FileLeaves
from consumers.executor import SyncResult
from consumers.replica.convert import convert
from consumers.replica.guard import Action, Admission, CopierHost, ReplicaView, admit
from consumers.replica.location import ReplicaLocation
from consumers.replica.scan import ReadInto
from consumers.replica.state import (
    HeldSync,
    ReplicaState,
    ReplicaStatus,
    TargetIdentity,
    TargetKind,
    Unknown,
    WritingSync,
    first_state,
)
from schemas.events import FailureReason, FullReason, ReplicationType, SyncPlanned

log = logging.getLogger("cbtstream.copier.replica")


class StalePlan(CbtStreamError):
    """The plan is older than what the replica holds: it is never written."""

    reason = FailureReason.STALE_PLAN


class ReplicaOnOtherHost(CbtStreamError):
    """A copier of a host-local pool found the replica's record written by another host: the
    plan is never written here (final: retrying on this host changes nothing)."""

    reason = FailureReason.REPLICA_ON_OTHER_HOST


class ReplicaFailedOver(CbtStreamError):
    """The replica is failed over (``cbtstream failover``): the operator's, never written by a
    sync until ``failover --undo`` (final: the next plan after the failback is written)."""

    reason = FailureReason.REPLICA_FAILED_OVER


#: The error each refusal raises (``Admission.failure``).
_REFUSALS: dict[FailureReason, type[CbtStreamError]] = {
    FailureReason.STALE_PLAN: StalePlan,
    FailureReason.REPLICA_ON_OTHER_HOST: ReplicaOnOtherHost,
    FailureReason.REPLICA_FAILED_OVER: ReplicaFailedOver,
}


def copier_host(settings: CopierSettings) -> CopierHost:
    """This copier as the replica guard sees it (host name, pool, storage)."""
    return CopierHost(settings.host_name, settings.pool, settings.storage)


class OutcomeAlreadyPublished(CbtStreamError):
    """The copier's ledger says this plan's outcome is published, and the replica record cannot
    confirm what it holds: the plan is skipped rather than written again."""

    reason = "outcome_already_published"


def pipeline_name(topic_prefix: str, app_id: str) -> str:
    return f"{topic_prefix}{app_id}"


@dataclass
class ReplicaSession:
    """The replica side of one sync, from admission to the clean record."""

    plan: SyncPlanned
    location: ReplicaLocation
    record: ReplicaState | Unknown | None
    admission: Admission
    pipeline: str
    here: CopierHost
    state: ReplicaState | None = None
    tree: HashTree | None = None
    #: A clean replica's version 1 tree: :meth:`convert` proves the replica and replaces it.
    legacy: V1Tree | None = None
    #: The leaf file the sync writes, and its generation (named by the new pieces file).
    leaves: FileLeaves | None = None
    leaves_generation: int = 0

    @classmethod
    async def begin(cls, loc: ReplicaLocation, plan: SyncPlanned, pipeline: str,
                    here: CopierHost, target: TargetIdentity | None = None) -> ReplicaSession:
        """Load the record and admit the plan for the copier ``here``. ``loc`` is the plan's
        placement, resolved once by the caller (``TargetResolver.locate``) and not worked out
        again here; ``target`` is the identity of an NBD target, already connected (files and
        block devices are looked up here). A refusal raises the error of its reason
        (:class:`StalePlan`, :class:`ReplicaOnOtherHost`)."""
        if loc.disk_key != plan.disk.key:
            raise ValueError(f"the location of {loc.disk_key} is not that of {plan.disk.key}")
        record = await asyncio.to_thread(loc.store.load)
        if loc.kind != TargetKind.NBD:
            target = await asyncio.to_thread(loc.identity)
        admission = admit(plan, ReplicaView(record, target), pipeline, here)
        state = record if isinstance(record, ReplicaState) else None
        session = cls(plan, loc, record, admission, pipeline, here, state)
        if admission.action == Action.REFUSE:
            raise _REFUSALS[admission.failure or FailureReason.STALE_PLAN](admission.detail)
        if admission.use_held_tree and state is not None and state.held is not None:
            tree = await asyncio.to_thread(loc.store.load_tree, state.held,
                                           plan.disk.capacity_bytes)
            if isinstance(tree, HashTree):
                session.tree = tree
            elif isinstance(tree, V1Tree) and state.status == ReplicaStatus.CLEAN:
                session.legacy = tree
            else:
                session.admission = Admission(
                    Action.WRITE, ReplicationType.FULL, FullReason.REPLICA_STATE_UNKNOWN,
                    "the replica's hash tree is missing or does not match its record"
                    if tree is None else "the replica was left dirty with a version 1 hash "
                    "tree (a sync interrupted before the upgrade): it cannot be proven")
        chosen = session.admission
        if chosen.reason != plan.reason or chosen.replication_type != plan.replication_type:
            log.warning("replica guard: copying in full", extra={
                "reason": chosen.reason, "detail": chosen.detail})
        return session

    @property
    def already_applied(self) -> SyncResult | None:
        """The recorded result, if the replica already holds this very sync."""
        if self.admission.action != Action.ALREADY_APPLIED or self.state is None:
            return None
        held = self.state.held
        assert held is not None
        return SyncResult(**held.result)

    async def convert(self, read_into: ReadInto) -> bool:
        """Prove the replica against its version 1 tree and switch its record to version 2
        (``convert.py``). False: the replica differs from its record, which is now marked
        ``mismatch``, and the admission is a full copy with ``replica_mismatch``."""
        assert self.legacy is not None and self.state is not None
        store = self.location.store
        done = await convert(store, self.state, read_into)
        self.legacy = None
        if isinstance(done, str):
            self.state = self.state.mismatched(done)
            await asyncio.to_thread(store.save, self.state)
            self.admission = Admission(Action.WRITE, ReplicationType.FULL,
                                       FullReason.REPLICA_MISMATCH, done)
            log.warning("replica guard: copying in full", extra={
                "reason": FullReason.REPLICA_MISMATCH, "detail": done})
            return False
        self.state, self.tree = done
        return True

    async def base_tree(self, replication_type: ReplicationType, capacity: int) -> HashTree:
        """The tree the sync starts from, with its leaf file open (after :meth:`mark_dirty`,
        under the lock): the held base's for an incremental (admitted, and not turned full by
        vSphere), else an all-zero disk in a new leaf file (a full copy rewrites every leaf:
        data, or zeroes elsewhere)."""
        store = self.location.store
        held = self.state.held if self.state is not None else None
        if (replication_type == ReplicationType.INCREMENTAL and self.tree is not None
                and held is not None):
            leaves, self.leaves_generation = await opened_in_thread(
                store.open_leaves, held, capacity, close=_close_leaves)
            self.leaves = leaves
            self.tree.leaves = self.leaves
            return self.tree
        self.leaves = await opened_in_thread(store.new_leaves, capacity, self.plan.generation,
                                             close=FileLeaves.close)
        self.leaves_generation = self.plan.generation
        return HashTree.zeros(capacity, self.leaves)

    def close(self) -> None:
        """Close the leaf file (the sync is over, however it ended)."""
        if self.leaves is not None:
            self.leaves.close()

    async def mark_dirty(self, replication_type: ReplicationType, target: TargetIdentity) -> None:
        """Durably record that this sync is about to write (before the first byte)."""
        writing = WritingSync(
            sync_id=self.plan.sync_id,
            generation=self.plan.generation,
            replication_type=replication_type,
            base_change_id=(self.admission.base_change_id or self.plan.base_change_id)
            if replication_type == ReplicationType.INCREMENTAL else None,
            snapshot_taken_at=self.plan.snapshot_taken_at,
        )
        disk, host = self.plan.disk, self.here.host
        if self.state is None or self.state.disk_key != disk.key:
            state = first_state(self.pipeline, disk.key, disk.backing_uuid, disk.capacity_bytes,
                                target, writing, host).model_copy(update={"disk": disk})
        else:
            state = self.state.dirty(writing, target, host).model_copy(update={
                "backing_uuid": disk.backing_uuid, "capacity_bytes": disk.capacity_bytes,
                "pipeline": self.pipeline, "disk": disk, "verified_at": None})
            if replication_type == ReplicationType.FULL:
                # a full copy makes whatever was held meaningless until it is clean again
                state = state.model_copy(update={"held": None})
        await asyncio.to_thread(self.location.store.save, state)
        self.state = state
        # another sync's checkpoint can never be resumed now (the fence refuses that sync)
        await asyncio.to_thread(self.location.store.prune_checkpoints, str(self.plan.sync_id))
        if replication_type == ReplicationType.FULL:
            await asyncio.to_thread(self.location.store.prune_trees)

    async def mark_clean(self, result: SyncResult, tree: HashTree, target: TargetIdentity
                         ) -> SyncResult:
        """After the flush: save the tree (leaf entries, then pieces), then the clean record
        naming it (all durable); only then drop the journal and the old trees."""
        assert self.state is not None and self.plan.change_id is not None
        assert self.leaves is not None and tree.leaves is self.leaves
        store = self.location.store
        await asyncio.to_thread(self.leaves.sync)
        tree_file = await asyncio.to_thread(store.save_tree, tree, self.plan.generation,
                                            self.leaves_generation)
        result = dataclasses.replace(result, replica_digest=tree.root())
        held = HeldSync(
            sync_id=self.plan.sync_id,
            generation=self.plan.generation,
            change_id=self.plan.change_id,
            vm_snapshot=self.plan.vm_snapshot,
            snapshot_taken_at=self.plan.snapshot_taken_at,
            replica_digest=tree.root(),
            tree_file=tree_file,
            result=dataclasses.asdict(result),
        )
        state = self.state.clean(held, target, self.here.host)
        await asyncio.to_thread(store.save, state)
        self.state = state
        await asyncio.to_thread(store.prune_trees, tree_file,
                                store.leaves_name(self.leaves_generation))
        return result


def _close_leaves(opened: tuple[FileLeaves, int]) -> None:
    """Close a leaf file a cancelled sync opened."""
    opened[0].close()

"""Durable replica records: the state record and the hash tree's files, written atomically.

A replica's record lives beside a file replica (``disk-204.img.state``), and for a block device
or NBD target in ``copier.record_dir`` (``<records_dir>/<slug>.state``, by default under
``<state_dir>/targets``; the slug a hash of the target's configured location), so a copier that
lost its state dir still knows what a file replica holds, and the members of a ``shared`` pool
all see one record per replica. Beside the record, the tree it names
(``consumers/copy/digest.py``):

* ``disk-204.img.pieces.<generation>``: the piece entries of the sync of that generation (32
  bytes per MiB), written whole per sync, and the generation of its leaf file;
* ``disk-204.img.leaves.<generation>``: the leaf entries (32 bytes per 64 KiB), created by a
  full copy (or a conversion) and rewritten in place by the incrementals after it, with
  ``disk-204.img.leaves.undo`` while one runs (``consumers/copy/leaves.py``);
* ``disk-204.img.tree.<generation>``: a version 1 tree, as older copiers wrote it (read, never
  written; converted by the next incremental, ``convert.py``);
* ``disk-204.img.checkpoint.<sync id>``: the resume checkpoint of a sync writing the replica
  (``consumers/copy/checkpoint.py``), removed once its outcome is published; marking another
  sync dirty drops it (that sync can never resume: the fence refuses it).

Every write is temp file -> fsync -> rename -> fsync of the directory, so a crash leaves the old
or the new record, never a mix. The record carries a blake3 checksum of its body, and the pieces
file is checked against the root the record names: a torn, edited or mismatched record is
reported as :class:`~consumers.replica.state.Unknown`, never as clean. All file operations are
relative to a directory descriptor opened with ``O_NOFOLLOW``, and names are derived from the
configuration and the disk key, never from event text.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
from pydantic import ValidationError

from cbtstream.errors import CbtStreamError
from cbtstream.threads import opened_in_thread
from consumers.copy import digest_v1 as v1
from consumers.copy.checkpoint import Checkpoint, checkpoint_name
from consumers.copy.digest import HASH, LEAF, PIECE, HashTree, piece_count
from consumers.copy.digest_v1 import V1Tree
from consumers.copy.dirfiles import open_dir, read_file, unlink_synced, write_atomic
from consumers.copy.leaves import FileLeaves, Journal, undo
from consumers.points.chain import forget_points
from consumers.replica.state import HeldSync, ReplicaState, Unknown

_V1_MAGIC = b"CBTTREE1"
_V1_HEAD = struct.Struct(">8sQQ")
#: magic, capacity, leaf size, piece size, generation of the leaf file
_PIECES_MAGIC = b"CBTPIEC2"
_PIECES_HEAD = struct.Struct(">8sQQQQ")
#: A record larger than this is not ours (records are a few KiB).
_MAX_RECORD = 1 << 20


log = logging.getLogger("cbtstream.copier.replica")


class ReplicaStateError(CbtStreamError):
    """The replica's record could not be written (the sync must not proceed)."""

    reason = "replica_state_error"


class ReplicaStore:
    """The record of one replica: ``<directory>/<name>.state`` and ``<name>.tree.<gen>``."""

    def __init__(self, directory: Path, name: str) -> None:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad record name {name!r}")
        self.directory = directory
        self.name = name

    @property
    def state_name(self) -> str:
        return f"{self.name}.state"

    def _dir_fd(self, create: bool) -> int:
        return open_dir(self.directory, create)

    # -- reading ----------------------------------------------------------------------------
    def load(self) -> ReplicaState | Unknown | None:
        """The record, ``Unknown`` if it exists but cannot be trusted, None if there is none."""
        try:
            dir_fd = self._dir_fd(create=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return Unknown(detail=f"cannot open {self.directory}: {exc.strerror}")
        try:
            raw = read_file(dir_fd, self.state_name, _MAX_RECORD)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return Unknown(detail=f"cannot read the record: {exc}")
        finally:
            os.close(dir_fd)
        return decode_record(raw)

    def _tree_head(self, held: HeldSync, capacity: int) -> tuple[bytes, int, int]:
        """(the held tree file's bytes, its format version, its leaf file's generation)."""
        v2 = held.tree_file.startswith(f"{self.name}.pieces.")
        if "/" in held.tree_file or not (v2 or held.tree_file.startswith(f"{self.name}.tree.")):
            raise ValueError("the record names no tree file of this replica")
        head = _PIECES_HEAD if v2 else _V1_HEAD
        dir_fd = self._dir_fd(create=False)
        try:
            raw = read_file(dir_fd, held.tree_file, head.size + HASH * piece_count(capacity))
        finally:
            os.close(dir_fd)
        if v2:
            magic, cap, leaf, piece, leaves = _PIECES_HEAD.unpack_from(raw)
            if (magic, cap, leaf, piece) != (_PIECES_MAGIC, capacity, LEAF, PIECE):
                raise ValueError("not a version 2 tree of this disk")
            return raw[head.size :], 2, leaves
        magic, cap, leaf = _V1_HEAD.unpack_from(raw)
        if (magic, cap, leaf) != (_V1_MAGIC, capacity, v1.LEAF):
            raise ValueError("not a version 1 tree of this disk")
        return raw[head.size :], 1, -1

    def load_tree(self, held: HeldSync, capacity: int) -> HashTree | V1Tree | None:
        """The held sync's tree (its pieces; leaves are opened by :meth:`open_leaves`), if its
        file is intact and folds to the recorded root. A version 1 tree is returned as such
        (``verify`` reads it; a sync converts it first)."""
        try:
            pieces, version, _ = self._tree_head(held, capacity)
            tree = (HashTree(capacity, bytearray(pieces)) if version == 2
                    else V1Tree(capacity, bytearray(pieces)))
        except (OSError, ValueError, struct.error):
            return None
        return tree if tree.root() == held.replica_digest else None

    def leaves_name(self, generation: int) -> str:
        return f"{self.name}.leaves.{generation}"

    @property
    def journal_name(self) -> str:
        return f"{self.name}.leaves.undo"

    def new_leaves(self, capacity: int, generation: int) -> FileLeaves:
        """A new all-zero leaf file for a full copy of ``generation`` (no journal: a full copy's
        base is the all-zero tree, and an interrupted one is redone from it)."""
        dir_fd = self._dir_fd(create=True)
        try:
            return FileLeaves.create(self.leaves_name(generation), capacity, dir_fd)
        finally:
            os.close(dir_fd)

    def open_leaves(self, held: HeldSync, capacity: int) -> tuple[FileLeaves, int]:
        """The leaf file of the held (version 2) tree, for a sync that starts from it, and its
        generation. Entries an interrupted sync rewrote are put back from the journal first;
        the sync's own journal will restore ``held``'s root. A missing or foreign leaf file is
        replaced by a zero one: its pieces then do not fold, and the engine proves each piece
        it touches whole from the replica (``HashTree.consistent``). Call under the lock."""
        _, version, generation = self._tree_head(held, capacity)
        if version != 2:
            raise ValueError("a version 1 tree is converted before a sync starts from it")
        name = self.leaves_name(generation)
        dir_fd = self._dir_fd(create=False)
        try:
            try:
                leaves = FileLeaves.open(name, capacity, dir_fd)
            except (FileNotFoundError, ValueError) as exc:
                log.warning("the replica's leaf file is missing or damaged: recreated; pieces "
                            "the sync touches are proven whole", extra={"error": str(exc)})
                leaves = FileLeaves.create(name, capacity, dir_fd)
            undo(self.journal_name, dir_fd, leaves, held.replica_digest)
            leaves.journal = Journal(dir_fd, self.journal_name, held.replica_digest)
        finally:
            os.close(dir_fd)
        return leaves, generation

    # -- writing ----------------------------------------------------------------------------
    def save(self, state: ReplicaState) -> None:
        """Replace the record atomically (durable when this returns)."""
        try:
            dir_fd = self._dir_fd(create=True)
            try:
                write_atomic(dir_fd, self.state_name, encode_record(state))
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise ReplicaStateError(f"cannot write the replica record {self.directory}/"
                                    f"{self.state_name}: {exc.strerror}") from exc

    def save_tree(self, tree: HashTree, generation: int, leaves: int) -> str:
        """Write the pieces file of ``generation``, naming the leaf file of generation
        ``leaves`` (which the caller made durable first); returns its name (for
        ``HeldSync.tree_file``)."""
        name = f"{self.name}.pieces.{generation}"
        try:
            dir_fd = self._dir_fd(create=True)
            try:
                head = _PIECES_HEAD.pack(_PIECES_MAGIC, tree.capacity, LEAF, PIECE, leaves)
                write_atomic(dir_fd, name, head + tree.pieces)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise ReplicaStateError(f"cannot write the replica tree {name}: {exc.strerror}"
                                    ) from exc
        return name

    def prune_trees(self, *keep: str) -> None:
        """Remove tree, pieces and leaf files and the journal, but ``keep`` (after the record
        naming them is durable)."""
        with contextlib.suppress(OSError):
            dir_fd = self._dir_fd(create=False)
            try:
                prefixes = tuple(f"{self.name}.{kind}." for kind in ("tree", "pieces", "leaves"))
                for entry in os.listdir(dir_fd):
                    if entry.startswith(prefixes) and entry not in keep:
                        with contextlib.suppress(OSError):
                            os.unlink(entry, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)

    def checkpoint(self, disk_key: str, sync_id: str) -> Checkpoint:
        """The resume checkpoint of sync ``sync_id`` of this replica, beside the record."""
        return Checkpoint(self.directory, disk_key, sync_id, beside=self.name)

    def prune_checkpoints(self, *keep_sync: str) -> None:
        """Remove the checkpoints of every sync but ``keep_sync`` (and leftover temp files of
        interrupted saves)."""
        keep = {checkpoint_name(self.name, s) for s in keep_sync}
        prefix = f"{self.name}.checkpoint."
        with contextlib.suppress(OSError):
            dir_fd = self._dir_fd(create=False)
            try:
                for entry in os.listdir(dir_fd):
                    name = entry[1:].rsplit(".tmp", 1)[0] if entry.startswith(".") else entry
                    if name.startswith(prefix) and entry not in keep:
                        with contextlib.suppress(OSError):
                            os.unlink(entry, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)

    @contextlib.asynccontextmanager
    async def lock(self, wait_s: float = 3600.0) -> AsyncIterator[None]:
        """Hold ``<name>.lock`` exclusively: a copier for a whole sync, ``verify`` while it
        checks and marks a replica, so neither sees or overwrites the other's half-done work.
        Raises :class:`ReplicaBusy` if it stays held for ``wait_s`` (0: do not wait)."""
        fd = await opened_in_thread(self._open_lock, close=os.close)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ReplicaBusy(f"{self.directory}/{self.name} is in use (a sync or "
                                          "a verify holds it)") from None
                    await asyncio.sleep(0.2)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _open_lock(self) -> int:
        dir_fd = self._dir_fd(create=True)
        try:
            return os.open(f"{self.name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o640, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def forget(self) -> None:
        """Remove the record, its trees, checkpoints and restore points (the replica is then
        of unknown state)."""
        self.prune_trees()
        self.prune_checkpoints()
        forget_points(self.directory, self.name)
        with contextlib.suppress(OSError):
            unlink_synced(self.directory, self.state_name)


class ReplicaBusy(CbtStreamError):
    """Another process holds the replica (a sync is running); try again later."""

    retriable = True
    reason = "replica_busy"


def encode_record(state: ReplicaState) -> bytes:
    body = state.model_dump(mode="json")
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({"record": body, "blake3": blake3.blake3(canon).hexdigest()},
                      sort_keys=True).encode() + b"\n"


def decode_record(raw: bytes) -> ReplicaState | Unknown:
    """Parse a record; anything but an intact record of the current version is ``Unknown``."""
    try:
        doc = json.loads(raw)
        body = doc["record"]
        canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if blake3.blake3(canon).hexdigest() != doc["blake3"]:
            return Unknown(detail="the record's checksum does not match (torn or edited)")
        return ReplicaState.model_validate(body)
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ValidationError):
            return Unknown(detail=f"the record is not a replica state: {exc.error_count()} errors")
        return Unknown(detail=f"the record does not parse: {type(exc).__name__}")

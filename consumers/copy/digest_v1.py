"""Version 1 of the replica hash tree, kept to read what older copiers recorded and published.

Definition (``blake3tree`` version 1): 1 MiB leaves folded straight into the root::

    leaf_i  = blake3(replica bytes [i * 1 MiB, min((i + 1) * 1 MiB, capacity)))
    root    = blake3("cbtstream-tree-v1" || u64be(capacity) || u64be(1 MiB) || leaf_0 || ... )
    replica_digest = "blake3tree:1048576:" + hex(root)

Nothing writes it any more: ``cbtstream verify`` recomputes it for a replica whose record still
names a version 1 root, and a replica's first incremental after the upgrade proves its bytes
against it once while building the version 2 tree (``consumers/replica/convert.py``).
"""

from __future__ import annotations

import struct

import blake3

from consumers.copy import digest as v2

LEAF = 1024 * 1024
PREFIX = "blake3tree"
_ROOT_TAG = b"cbtstream-tree-v1"
_U64X2 = struct.Struct(">QQ")


def version_of(replica_digest: str) -> int:
    """1 or 2 for the tree a ``replica_digest`` is the root of, 0 for anything else."""
    head = replica_digest.split(":", 1)[0]
    return {PREFIX: 1, v2.PREFIX: 2}.get(head, 0)


class V1Tree:
    """A version 1 tree: one hash per 1 MiB of disk (the same grain as version 2's pieces, so
    ``verify`` compares either kind by ``pieces``)."""

    __slots__ = ("capacity", "pieces")

    def __init__(self, capacity: int, pieces: bytearray) -> None:
        if len(pieces) != v2.piece_count(capacity) * v2.HASH:
            raise ValueError(f"{len(pieces)} bytes of leaves do not fit a {capacity}-byte disk")
        self.capacity = capacity
        self.pieces = pieces

    def root(self) -> str:
        h = blake3.blake3(_ROOT_TAG)
        h.update(_U64X2.pack(self.capacity, LEAF))
        h.update(self.pieces)
        return f"{PREFIX}:{LEAF}:{h.hexdigest()}"


def leaf_hash(data: memoryview | bytes) -> bytes:
    """A version 1 leaf: plain blake3, zero bytes included (thread-safe)."""
    return blake3.blake3(data).digest()


def hash_pieces(data: memoryview) -> bytes:
    """The version 1 leaves of whole MiBs read from a MiB boundary (the last may be short)."""
    return b"".join(leaf_hash(data[a : a + LEAF]) for a in range(0, len(data), LEAF))

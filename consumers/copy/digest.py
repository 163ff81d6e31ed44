"""The replica hash tree: what a replica holds, recomputable from the replica alone.

Definition (``blake3tree`` version 1). Cut the disk of ``capacity`` bytes into leaves of
:data:`LEAF` bytes (1 MiB; the last leaf may be shorter). Then::

    leaf_i  = blake3(replica bytes [i * LEAF, min((i + 1) * LEAF, capacity)))
    root    = blake3("cbtstream-tree-v1" || u64be(capacity) || u64be(LEAF) || leaf_0 || ... )
    replica_digest = "blake3tree:1048576:" + hex(root)

A sync rehashes only the leaves it touched (every leaf overlapping one of its planned ranges) and
keeps the others from the tree of the replica it started from, so maintaining the digest costs
O(bytes written) hashing plus 32 bytes per MiB of disk to fold the root. A zero leaf hashes to a
constant (:func:`zero_leaf`), so holes and zero runs are never hashed.

A leaf a sync covers only in part keeps bytes the sync does not write; before they are hashed
into the new tree they must be proven to be the base's (:func:`holds_base`, used by the copy
engine), else a corrupt replica would be certified as good.

The digest of one sync (``ChangeIdCommitted.digest``) covers just the touched leaves::

    digest = "blake3:" + hex(blake3( for each run of touched leaves: u64be(first) || u64be(count)
                                     || leaf_first || ... || leaf_(first+count-1) ))

Both are recomputed by ``cbtstream verify`` and by the copier's ``verify`` option by reading the
replica (:func:`leaves_of_target`).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator

import blake3

from cbtstream.extents import Extent

LEAF = 1024 * 1024
HASH = 32
PREFIX = "blake3tree"
_ROOT_TAG = b"cbtstream-tree-v1"
_U64X2 = struct.Struct(">QQ")
_ZERO: dict[int, bytes] = {}
#: Hash buffers at least this large with several threads (the crate releases the GIL).
_THREADED = 8 * LEAF


def leaf_hash(data: memoryview | bytes) -> bytes:
    if len(data) >= _THREADED:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    return blake3.blake3(data).digest()


def zero_leaf(length: int = LEAF) -> bytes:
    """Hash of ``length`` zero bytes (cached: at most two lengths occur per disk)."""
    h = _ZERO.get(length)
    if h is None:
        h = blake3.blake3(bytes(length)).digest()
        if len(_ZERO) < 64:
            _ZERO[length] = h
    return h


def leaf_count(capacity: int) -> int:
    return -(-capacity // LEAF)


def leaf_span(index: int, capacity: int) -> Extent:
    start = index * LEAF
    return Extent(start, min(LEAF, capacity - start))


def touched_leaves(ranges: Iterable[Extent]) -> Iterator[tuple[int, int]]:
    """Runs ``(first leaf, count)`` of the leaves overlapping ``ranges`` (sorted, disjoint)."""
    first = end = -1
    for r in ranges:
        if r.length <= 0:
            continue
        a, b = r.start // LEAF, (r.end - 1) // LEAF + 1
        if a <= end:
            end = max(end, b)
            continue
        if end > first >= 0:
            yield first, end - first
        first, end = a, b
    if end > first >= 0:
        yield first, end - first


class HashTree:
    """Leaf hashes of one replica, ``32 * leaf_count`` bytes in one buffer (32 MiB per TiB)."""

    __slots__ = ("capacity", "leaves")

    def __init__(self, capacity: int, leaves: bytearray) -> None:
        if len(leaves) != leaf_count(capacity) * HASH:
            raise ValueError(f"{len(leaves)} bytes of leaves do not fit a {capacity}-byte disk")
        self.capacity = capacity
        self.leaves = leaves

    @classmethod
    def zeros(cls, capacity: int) -> HashTree:
        """The tree of an all-zero disk."""
        n = leaf_count(capacity)
        tail = capacity - (n - 1) * LEAF if n else 0
        leaves = bytearray(zero_leaf(LEAF) * max(0, n - 1))
        if n:
            leaves += zero_leaf(tail)
        return cls(capacity, leaves)

    def __len__(self) -> int:
        return len(self.leaves) // HASH

    def get(self, index: int) -> bytes:
        return bytes(self.leaves[index * HASH : (index + 1) * HASH])

    def set(self, index: int, digest: bytes) -> None:
        if not 0 <= index < len(self) or len(digest) != HASH:
            raise ValueError(f"leaf {index} outside the tree or bad hash length")
        self.leaves[index * HASH : (index + 1) * HASH] = digest

    def root(self) -> str:
        h = blake3.blake3(_ROOT_TAG)
        h.update(_U64X2.pack(self.capacity, LEAF))
        h.update(self.leaves)
        return f"{PREFIX}:{LEAF}:{h.hexdigest()}"

    def touched_digest(self, ranges: Iterable[Extent]) -> str:
        """The digest of a sync that touched ``ranges`` (see the module docstring)."""
        h = blake3.blake3()
        for first, count in touched_leaves(ranges):
            h.update(_U64X2.pack(first, count))
            h.update(memoryview(self.leaves)[first * HASH : (first + count) * HASH])
        return "blake3:" + h.hexdigest()


def full_leaves(offset: int, length: int, capacity: int) -> range:
    """Indexes of the leaves lying entirely inside ``[offset, offset+length)``."""
    end = offset + length
    first = -(-offset // LEAF)
    last = end // LEAF if end < capacity else leaf_count(capacity)
    return range(first, max(first, last))


def hash_item(offset: int, data: memoryview, capacity: int) -> list[tuple[int, bytes]]:
    """Leaf hashes of the leaves entirely inside ``data`` written at ``offset`` (thread-safe)."""
    out = []
    for i in full_leaves(offset, len(data), capacity):
        span = leaf_span(i, capacity)
        rel = span.start - offset
        out.append((i, leaf_hash(data[rel : rel + span.length])))
    return out


def zero_item(offset: int, length: int, capacity: int) -> list[tuple[int, bytes]]:
    return [(i, zero_leaf(leaf_span(i, capacity).length))
            for i in full_leaves(offset, length, capacity)]


def partial_leaves(offset: int, length: int, capacity: int) -> list[int]:
    """Leaves that ``[offset, offset+length)`` covers only in part (at most two)."""
    if length <= 0:
        return []
    inside = full_leaves(offset, length, capacity)
    edges = {offset // LEAF, (offset + length - 1) // LEAF}
    return sorted(i for i in edges if i not in inside)


def untouched(span: Extent, touched: Iterable[Extent]) -> list[tuple[int, int]]:
    """The runs ``(start, end)``, relative to the leaf ``span``, that ``touched`` (sorted,
    disjoint, inside the leaf) does not cover: the bytes a sync keeps from the replica."""
    out = []
    pos = span.start
    for t in touched:
        if t.start > pos:
            out.append((pos - span.start, t.start - span.start))
        pos = max(pos, t.end)
    if pos < span.end:
        out.append((pos - span.start, span.length))
    return out


def holds_base(leaf: memoryview, base: bytes, keep: Iterable[tuple[int, int]]) -> bool:
    """Does ``leaf`` (a replica leaf as read before a sync writes into it) prove that its runs
    ``keep`` (see :func:`untouched`) hold what the base tree's hash ``base`` describes?

    For a zero leaf in the base (a full copy's starting point, or a hole) the runs themselves
    must be zero: exact, and the bytes the sync overwrites do not matter. Otherwise the whole
    leaf must hash to ``base``: a leaf hash cannot be split, so a difference only in the bytes
    the sync overwrites (an interrupted earlier write) also fails the proof; the caller then
    asks the source (:func:`same_runs`). Thread-safe (hashing releases the GIL)."""
    if base == zero_leaf(len(leaf)):
        return all(leaf[a:b].tobytes() == bytes(b - a) for a, b in keep)
    return leaf_hash(leaf) == base


def same_runs(a: memoryview, b: memoryview, runs: Iterable[tuple[int, int]]) -> bool:
    """Are the runs ``(start, end)`` of ``a`` and ``b`` byte for byte equal?"""
    return all(a[s:e].tobytes() == b[s:e].tobytes() for s, e in runs)


async def leaves_of_target(
    indexes: Iterable[int],
    capacity: int,
    read_into: Callable[[int, memoryview], Awaitable[None]],
) -> AsyncIterator[tuple[int, bytes]]:
    """Hash leaves by reading them from a replica (a verifier's view)."""
    view = memoryview(bytearray(LEAF))
    for i in indexes:
        span = leaf_span(i, capacity)
        piece = view[: span.length]
        await read_into(span.start, piece)
        yield i, leaf_hash(piece)

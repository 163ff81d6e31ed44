"""The replica hash tree: what a replica holds, recomputable from the replica alone.

Definition (``blake3tree2``, version 2). Cut the disk of ``capacity`` bytes into leaves of
:data:`LEAF` bytes (64 KiB) and pieces of :data:`PIECE` bytes (1 MiB, :data:`FANOUT` leaves; the
last leaf and piece may be shorter). Then::

    leaf_i  = blake3(replica bytes of leaf i)          or 32 zero bytes if those bytes are all zero
    piece_j = blake3("cbtstream-piece-v2" || leaf entries of piece j)
                                                       or 32 zero bytes if every entry is
    root    = blake3("cbtstream-tree-v2" || u64be(capacity) || u64be(LEAF) || u64be(PIECE)
                     || piece_0 || piece_1 || ...)
    replica_digest = "blake3tree2:65536:1048576:" + hex(root)

Why two levels: a sync rehashes the leaves it touched and keeps the others' entries from the
base's tree. An incremental's changed areas are CBT blocks (64 KiB and up), so with 64 KiB leaves
they almost never cover a leaf in part, and an *edge leaf* (read from the replica and proven
before it is rehashed, :func:`holds_base`) costs 64 KiB instead of 1 MiB. But 32 bytes per
64 KiB is 2 GiB for a 4 TiB disk: the leaf entries live in a file (``consumers/copy/leaves.py``,
a :class:`LeafStore`), and only the piece entries (32 bytes per MiB, 128 MiB for 4 TiB, as
version 1's leaves were) are held in memory; the root folds over those. A zero entry stands for
a zero leaf or piece, so a new disk's tree is a sparse file and an empty piece array, and holes
are never hashed.

Version 1 (``blake3tree:1048576:<hex>``: 1 MiB leaves folded straight into the root) is read by
``cbtstream verify`` and converted on a replica's first incremental after the upgrade
(:mod:`consumers.copy.digest_v1`, ``consumers/replica/convert.py``).

The digest of one sync (``ChangeIdCommitted.digest``) covers just the touched leaves::

    digest = "blake3:" + hex(blake3( for each run of touched leaves: u64be(first) || u64be(count)
                                     || leaf_first || ... || leaf_(first+count-1) ))
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Protocol

import blake3

from cbtstream.extents import Extent

LEAF = 64 * 1024
PIECE = 1024 * 1024
FANOUT = PIECE // LEAF
HASH = 32
#: The entry of an all-zero leaf or piece.
ZERO = bytes(HASH)
PREFIX = "blake3tree2"
_PIECE_TAG = b"cbtstream-piece-v2"
_ROOT_TAG = b"cbtstream-tree-v2"
_U64X2 = struct.Struct(">QQ")
_U64X3 = struct.Struct(">QQQ")
_ZERO_HASH: dict[int, bytes] = {}
_ZERO_ENTRIES = bytes(FANOUT * HASH)
#: Pieces folded per read of the leaf store (64 KiB of entries).
_FOLD_BATCH = 128


def _zero_hash(length: int) -> bytes:
    """blake3 of ``length`` zero bytes (cached: at most two lengths occur per disk)."""
    h = _ZERO_HASH.get(length)
    if h is None:
        h = blake3.blake3(bytes(length)).digest()
        if len(_ZERO_HASH) < 64:
            _ZERO_HASH[length] = h
    return h


def leaf_entry(data: memoryview | bytes) -> bytes:
    """A leaf's entry: its blake3, or :data:`ZERO` for zero bytes (thread-safe)."""
    h = blake3.blake3(data).digest()
    return ZERO if h == _zero_hash(len(data)) else h


def fold(entries: bytes | memoryview) -> bytes:
    """A piece's entry from its leaves' entries."""
    if bytes(entries) == _ZERO_ENTRIES[: len(entries)]:
        return ZERO
    h = blake3.blake3(_PIECE_TAG)
    h.update(entries)
    return h.digest()


def leaf_count(capacity: int) -> int:
    return -(-capacity // LEAF)


def piece_count(capacity: int) -> int:
    return -(-capacity // PIECE)


def leaf_span(index: int, capacity: int) -> Extent:
    start = index * LEAF
    return Extent(start, min(LEAF, capacity - start))


def piece_span(index: int, capacity: int) -> Extent:
    start = index * PIECE
    return Extent(start, min(PIECE, capacity - start))


def touched_units(ranges: Iterable[Extent], unit: int = LEAF) -> Iterator[tuple[int, int]]:
    """Runs ``(first, count)`` of the ``unit``-sized blocks overlapping ``ranges`` (sorted,
    disjoint): leaves by default, pieces with ``unit=PIECE``."""
    first = end = -1
    for r in ranges:
        if r.length <= 0:
            continue
        a, b = r.start // unit, (r.end - 1) // unit + 1
        if a <= end:
            end = max(end, b)
            continue
        if end > first >= 0:
            yield first, end - first
        first, end = a, b
    if end > first >= 0:
        yield first, end - first


def partial_pieces(ranges: Iterable[Extent], capacity: int) -> list[int]:
    """Pieces that ``ranges`` (sorted, disjoint) cover only in part: the pieces whose untouched
    leaves keep their entries from the base tree."""
    covered: dict[int, int] = {}
    for r in ranges:
        if r.length <= 0:
            continue
        for j in {r.start // PIECE, (r.end - 1) // PIECE}:  # pieces in between are covered
            covered[j] = covered.get(j, 0) + min(r.end, (j + 1) * PIECE) - max(r.start, j * PIECE)
    return sorted(j for j, n in covered.items() if n < piece_span(j, capacity).length)


class LeafStore(Protocol):
    """Where a tree keeps its leaf entries (32 bytes each, leaf index order)."""

    def read(self, first: int, count: int) -> bytes: ...

    def write(self, first: int, entries: bytes | memoryview) -> None: ...

    def protect(self, old: Iterable[tuple[int, bytes]]) -> None:
        """The leaves ``(first, their entries now)`` in ``old`` are about to be rewritten: keep
        those entries recoverable until the new tree is recorded (a file store journals them;
        see ``leaves.py``). ``old`` must be consumed whole (its reader checks the base)."""
        ...

    def close(self) -> None: ...


class MemoryLeaves:
    """Leaf entries in one buffer (tests, small disks): 32 bytes per 64 KiB of disk."""

    def __init__(self, entries: bytearray) -> None:
        self.entries = entries

    def read(self, first: int, count: int) -> bytes:
        return bytes(self.entries[first * HASH : (first + count) * HASH])

    def write(self, first: int, entries: bytes | memoryview) -> None:
        if first < 0 or (first * HASH + len(entries)) > len(self.entries):
            raise ValueError(f"leaves {first}+{len(entries) // HASH} outside the tree")
        self.entries[first * HASH : first * HASH + len(entries)] = entries

    def protect(self, old: Iterable[tuple[int, bytes]]) -> None:
        for _ in old:  # nothing to keep: a buffer does not survive a crash
            pass

    def close(self) -> None:
        return None


class HashTree:
    """One replica's tree: piece entries in memory, leaf entries in a :class:`LeafStore`
    (None: a tree known by its pieces only, as loaded to check a record or computed by verify).
    """

    __slots__ = ("capacity", "leaves", "pieces")

    def __init__(self, capacity: int, pieces: bytearray, leaves: LeafStore | None = None) -> None:
        if len(pieces) != piece_count(capacity) * HASH:
            raise ValueError(f"{len(pieces)} bytes of pieces do not fit a {capacity}-byte disk")
        self.capacity = capacity
        self.pieces = pieces
        self.leaves = leaves

    @classmethod
    def zeros(cls, capacity: int, leaves: LeafStore | None = None) -> HashTree:
        """The tree of an all-zero disk (leaves in memory unless a zeroed store is given)."""
        if leaves is None:
            leaves = MemoryLeaves(bytearray(leaf_count(capacity) * HASH))
        return cls(capacity, bytearray(piece_count(capacity) * HASH), leaves)

    @classmethod
    def of_leaves(cls, capacity: int, leaves: LeafStore) -> HashTree:
        """The tree whose leaf entries ``leaves`` holds (its pieces folded from them)."""
        tree = cls(capacity, bytearray(piece_count(capacity) * HASH), leaves)
        tree.refold([(0, piece_count(capacity))])
        return tree

    @property
    def leaf_count(self) -> int:
        return leaf_count(self.capacity)

    def store(self) -> LeafStore:
        if self.leaves is None:
            raise ValueError("this tree was loaded without its leaves")
        return self.leaves

    def leaf(self, index: int) -> bytes:
        return self.store().read(index, 1)

    def set_leaves(self, first: int, entries: bytes | memoryview) -> None:
        """Entries of the leaves ``first``, ``first + 1``, ... (their pieces are refolded by
        :meth:`refold`)."""
        if first < 0 or first + len(entries) // HASH > self.leaf_count or \
                len(entries) % HASH:
            raise ValueError(f"leaves {first}+{len(entries) // HASH} outside the tree")
        self.store().write(first, entries)

    def piece(self, index: int) -> bytes:
        return bytes(self.pieces[index * HASH : (index + 1) * HASH])

    def piece_leaves(self, index: int) -> tuple[int, int]:
        """``(first leaf, count)`` of a piece."""
        first = index * FANOUT
        return first, min(FANOUT, self.leaf_count - first)

    def consistent(self, index: int) -> bool:
        """Do the stored entries of the piece's leaves fold to its entry? (False after a crash
        lost the leaf file's update, or bit rot in it; the engine then proves the piece whole.)"""
        first, n = self.piece_leaves(index)
        return fold(self.store().read(first, n)) == self.piece(index)

    def refold(self, runs: Iterable[tuple[int, int]]) -> None:
        """Recompute the entries of the pieces in ``runs`` (``(first, count)``) from the leaves."""
        store = self.store()
        total = self.leaf_count
        for first, count in runs:
            for j0 in range(first, first + count, _FOLD_BATCH):
                j1 = min(first + count, j0 + _FOLD_BATCH)
                lo, hi = j0 * FANOUT, min(total, j1 * FANOUT)
                raw = memoryview(store.read(lo, hi - lo))
                for j in range(j0, j1):
                    a = (j * FANOUT - lo) * HASH
                    self.pieces[j * HASH : (j + 1) * HASH] = fold(raw[a : a + FANOUT * HASH])

    def root(self) -> str:
        return root_of_pieces(self.capacity, self.pieces)

    def touched_digest(self, ranges: Iterable[Extent]) -> str:
        """The digest of a sync that touched ``ranges`` (see the module docstring)."""
        h = blake3.blake3()
        store = self.store()
        for first, count in touched_units(ranges):
            h.update(_U64X2.pack(first, count))
            for i in range(first, first + count, 1 << 16):
                h.update(store.read(i, min(1 << 16, first + count - i)))
        return "blake3:" + h.hexdigest()


def root_of_pieces(capacity: int, pieces: bytes | bytearray) -> str:
    h = blake3.blake3(_ROOT_TAG)
    h.update(_U64X3.pack(capacity, LEAF, PIECE))
    h.update(pieces)
    return f"{PREFIX}:{LEAF}:{PIECE}:{h.hexdigest()}"


def full_leaves(offset: int, length: int, capacity: int) -> range:
    """Indexes of the leaves lying entirely inside ``[offset, offset+length)``."""
    end = offset + length
    first = -(-offset // LEAF)
    last = end // LEAF if end < capacity else leaf_count(capacity)
    return range(first, max(first, last))


def hash_run(offset: int, data: memoryview, capacity: int) -> tuple[int, bytes]:
    """``(first leaf, entries)`` of the leaves entirely inside ``data`` written at ``offset``
    (thread-safe: hashing releases the GIL)."""
    inside = full_leaves(offset, len(data), capacity)
    out = bytearray()
    for i in inside:
        span = leaf_span(i, capacity)
        rel = span.start - offset
        out += leaf_entry(data[rel : rel + span.length])
    return inside.start, bytes(out)


def zero_run(offset: int, length: int, capacity: int) -> tuple[int, bytes]:
    inside = full_leaves(offset, length, capacity)
    return inside.start, bytes(len(inside) * HASH)


def untouched(span: Extent, touched: Iterable[Extent]) -> list[tuple[int, int]]:
    """The runs ``(start, end)``, relative to the unit ``span`` (a leaf or a piece), that
    ``touched`` (sorted, disjoint, inside the unit) does not cover: the bytes a sync keeps from
    the replica."""
    out = []
    pos = span.start
    for t in touched:
        if t.start > pos:
            out.append((pos - span.start, t.start - span.start))
        pos = max(pos, t.end)
    if pos < span.end:
        out.append((pos - span.start, span.length))
    return out


def holds_base(unit: memoryview, base: bytes, keep: Iterable[tuple[int, int]],
               piece: bool = False) -> bool:
    """Does ``unit`` (a leaf, or with ``piece`` a whole piece, as read from the replica before
    a sync writes into it) prove that its runs ``keep`` (see :func:`untouched`) hold what the
    base tree's entry ``base`` describes?

    For a zero entry in the base (a full copy's starting point, or a hole) the runs themselves
    must be zero: exact, and the bytes the sync overwrites do not matter. Otherwise the whole
    unit must hash to ``base`` (a piece: its leaves' entries folded): a hash cannot be split, so
    a difference only in the bytes the sync overwrites (an interrupted earlier write) also fails
    the proof; the caller then asks the source (:func:`same_runs`). Thread-safe."""
    if base == ZERO:
        return all(unit[a:b].tobytes() == bytes(b - a) for a, b in keep)
    if piece:
        return fold(unit_entries(unit)) == base
    return leaf_entry(unit) == base


def unit_entries(unit: memoryview) -> bytes:
    """Entries of the leaves of a unit that starts on a leaf boundary (its tail may be short)."""
    return b"".join(leaf_entry(unit[a : a + LEAF]) for a in range(0, len(unit), LEAF))


def hash_pieces(data: memoryview) -> tuple[bytes, bytes]:
    """``(leaf entries, piece entries)`` of whole pieces read from a piece boundary (the last
    piece may be short: the disk's end). Thread-safe."""
    leaves = unit_entries(data)
    step = FANOUT * HASH
    return leaves, b"".join(fold(leaves[k : k + step]) for k in range(0, len(leaves), step))


def same_runs(a: memoryview, b: memoryview, runs: Iterable[tuple[int, int]]) -> bool:
    """Are the runs ``(start, end)`` of ``a`` and ``b`` byte for byte equal?"""
    return all(a[s:e].tobytes() == b[s:e].tobytes() for s, e in runs)

"""The digest of a sync: what was written, recomputable from the target alone.

Definition (version 1). Let the *ranges* of a sync be the planned ranges of the copy
(:func:`consumers.copy.plan.plan_ranges` of the changed areas, the disk capacity and the merge
gap), in ascending offset order. Cut every range at each disk offset that is a multiple of
:data:`PIECE` (1 MiB), giving pieces ``(offset, length)``. Then::

    digest = "sha256:" + hex(sha256( R_1 || R_2 || ... || R_n ))
    R_i    = u64be(offset_i) || u64be(length_i) || sha256(target bytes [offset_i, +length_i))

Every byte of a range is on the target after the copy: data that was read, and zero runs (holes,
zero blocks) that were written as zeroes, which hash as zeroes. So a verifier reads the target
over the same ranges and recomputes the same value (:func:`digest_of_target` does exactly that).

Why per-piece inner hashes: pieces are hashed in worker threads as soon as their bytes are
written, in any order (hashlib releases the GIL on large buffers), and only 48 bytes per MiB are
folded in order; zero pieces cost a dictionary lookup instead of hashing zeroes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Awaitable, Callable, Iterable

from cbtstream.extents import Extent
from consumers.copy.plan import split_aligned

PIECE = 1024 * 1024
_HEAD = struct.Struct(">QQ")
_ZERO_HASH: dict[int, bytes] = {}


def zero_piece_hash(length: int) -> bytes:
    h = _ZERO_HASH.get(length)
    if h is None:
        h = hashlib.sha256(bytes(length)).digest()
        if len(_ZERO_HASH) < 64:
            _ZERO_HASH[length] = h
    return h


def data_records(offset: int, data: memoryview) -> bytes:
    """Records ``R_i`` of the pieces of ``data`` written at ``offset`` (thread-safe, no GIL use
    while hashing)."""
    out = []
    for start, length in split_aligned(offset, len(data), PIECE):
        rel = start - offset
        out.append(_HEAD.pack(start, length) + hashlib.sha256(data[rel : rel + length]).digest())
    return b"".join(out)


def zero_records(offset: int, length: int) -> bytes:
    return b"".join(
        _HEAD.pack(s, n) + zero_piece_hash(n) for s, n in split_aligned(offset, length, PIECE)
    )


class DigestFolder:
    """Folds records of sequence-numbered work items into the digest, in sequence order.

    Items complete out of order (several requests are in flight); records wait here until all
    earlier items are in. Memory is bounded by the number of items in flight.
    """

    def __init__(self, first_seq: int = 0) -> None:
        self._hash = hashlib.sha256()
        self._next = first_seq
        self._waiting: dict[int, bytes] = {}

    def add(self, seq: int, records: bytes) -> None:
        if seq < self._next or seq in self._waiting:
            raise ValueError(f"digest item {seq} added twice")
        self._waiting[seq] = records
        while self._next in self._waiting:
            self._hash.update(self._waiting.pop(self._next))
            self._next += 1

    @property
    def next_seq(self) -> int:
        return self._next

    def hexdigest(self) -> str:
        if self._waiting:
            raise RuntimeError(f"digest incomplete: items {sorted(self._waiting)[:5]} wait")
        return "sha256:" + self._hash.hexdigest()


async def digest_of_target(
    ranges: Iterable[Extent],
    read_into: Callable[[int, memoryview], Awaitable[None]],
    chunk: int = 8 * PIECE,
) -> str:
    """Recompute a sync's digest by reading the target over ``ranges`` (a verifier's view)."""
    folder = DigestFolder()
    buf = memoryview(bytearray(chunk))
    seq = 0
    for r in ranges:
        for start, length in split_aligned(r.start, r.length, chunk):
            view = buf[:length]
            await read_into(start, view)
            folder.add(seq, data_records(start, view))
            seq += 1
    return folder.hexdigest()

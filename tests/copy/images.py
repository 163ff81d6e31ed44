"""Test disk images: random data, holes and allocated zero blocks at known places."""

from __future__ import annotations

import os
import random
from pathlib import Path

M = 1 << 20


def make_image(path: Path, size: int, seed: int, layout: list[tuple[int, int, str]]) -> None:
    """Create a sparse file of ``size`` bytes; ``layout`` entries are (offset, length, kind) with
    kind ``data`` (random bytes) or ``zeros`` (allocated zero bytes); the rest stays a hole."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for off, n, kind in layout:
            f.seek(off)
            f.write(rng.randbytes(n) if kind == "data" else bytes(n))


def apply(base: bytes, new: bytes, extents: list[tuple[int, int]]) -> bytes:
    out = bytearray(base)
    for s, n in extents:
        out[s : s + n] = new[s : s + n]
    return bytes(out)


def punch(path: Path, offset: int, length: int) -> None:
    """Replace a range by zeroes (a hole where the file system supports it)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(length), offset)
    finally:
        os.close(fd)

"""Guest writes for the demo and tests (pure: a seeded generator of (offset, data) writes).

Writes include the hard cases: the very last bytes of a disk, lengths and offsets that are not
block aligned, and writes of zeroes over data (which a copier must not skip).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Write:
    device_key: int
    offset: int
    data: bytes


def _chunk(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def initial_fill(rng: random.Random, device_key: int, capacity: int,
                 fraction: float = 0.3) -> list[Write]:
    """Random 1 MiB chunks over about ``fraction`` of the disk, plus its last 4 KiB."""
    chunks = capacity // MiB
    picked = sorted(rng.sample(range(chunks), max(1, int(chunks * fraction))))
    writes = [Write(device_key, i * MiB, _chunk(rng, MiB)) for i in picked]
    writes.append(Write(device_key, capacity - 4 * KiB, _chunk(rng, 4 * KiB)))
    return writes


def scattered(rng: random.Random, device_key: int, capacity: int, count: int = 12) -> list[Write]:
    """``count`` writes of 1 byte to 300 KiB at unaligned offsets, one ending at the disk's last
    byte, and one run of zeroes."""
    writes = []
    for _ in range(count):
        length = rng.choice([1, 511, 4 * KiB, 65 * KiB + 3, 300 * KiB])
        offset = rng.randrange(0, capacity - length)
        writes.append(Write(device_key, offset, _chunk(rng, length)))
    writes.append(Write(device_key, capacity - 777, _chunk(rng, 777)))
    zero_at = rng.randrange(0, capacity - 256 * KiB)
    writes.append(Write(device_key, zero_at, bytes(256 * KiB)))
    return writes

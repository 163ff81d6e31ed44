"""An independent reading of the replica hash tree definition (``consumers/copy/digest.py``),
written from its docstring, so tests compare the engine's trees with the definition itself."""

from __future__ import annotations

import struct

import blake3

LEAF = 1 << 20


def leaves_of(data: bytes) -> list[bytes]:
    return [blake3.blake3(data[i : i + LEAF]).digest() for i in range(0, len(data), LEAF)]


def root_of(data: bytes) -> str:
    h = blake3.blake3(b"cbtstream-tree-v1" + struct.pack(">QQ", len(data), LEAF))
    for leaf in leaves_of(data):
        h.update(leaf)
    return f"blake3tree:{LEAF}:{h.hexdigest()}"

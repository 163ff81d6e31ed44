"""An independent reading of the replica hash tree definitions (``consumers/copy/digest.py`` for
version 2, ``digest_v1.py`` for version 1), written from their docstrings, so tests compare the
engine's trees with the definitions themselves."""

from __future__ import annotations

import struct

import blake3

LEAF = 64 << 10
PIECE = 1 << 20
V1_LEAF = 1 << 20


def leaves_of(data: bytes) -> list[bytes]:
    """Version 2 leaf entries: blake3 of each 64 KiB, 32 zero bytes for a zero leaf."""
    out = []
    for i in range(0, len(data), LEAF):
        leaf = data[i : i + LEAF]
        out.append(bytes(32) if leaf == bytes(len(leaf)) else blake3.blake3(leaf).digest())
    return out


def pieces_of(data: bytes) -> list[bytes]:
    leaves = leaves_of(data)
    out = []
    for j in range(0, len(leaves), PIECE // LEAF):
        entries = b"".join(leaves[j : j + PIECE // LEAF])
        out.append(bytes(32) if entries == bytes(len(entries))
                   else blake3.blake3(b"cbtstream-piece-v2" + entries).digest())
    return out


def root_of(data: bytes) -> str:
    h = blake3.blake3(b"cbtstream-tree-v2" + struct.pack(">QQQ", len(data), LEAF, PIECE))
    for piece in pieces_of(data):
        h.update(piece)
    return f"blake3tree2:{LEAF}:{PIECE}:{h.hexdigest()}"


def root_of_v1(data: bytes) -> str:
    h = blake3.blake3(b"cbtstream-tree-v1" + struct.pack(">QQ", len(data), V1_LEAF))
    for i in range(0, len(data), V1_LEAF):
        h.update(blake3.blake3(data[i : i + V1_LEAF]).digest())
    return f"blake3tree:{V1_LEAF}:{h.hexdigest()}"


def leaves_of_v1(data: bytes) -> list[bytes]:
    return [blake3.blake3(data[i : i + V1_LEAF]).digest() for i in range(0, len(data), V1_LEAF)]

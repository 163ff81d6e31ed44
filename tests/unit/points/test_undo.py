"""The undo store: first saved bytes win, torn tails are cut back to the valid prefix, a seal
pins the store, and damage is detected."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from consumers.points.undo import (
    ENTRY,
    HEAD,
    MAX_EXTENT,
    UndoCorrupt,
    UndoSealed,
    UndoStore,
    UndoWriter,
    file_names,
    store_of,
)

NAME = "disk-2000.img"
STORE = "a1b2c3"
CAP = 4 << 20


def _writer(tmp_path: Path) -> UndoWriter:
    return UndoWriter.open(tmp_path, NAME, STORE, CAP)


def _store(tmp_path: Path) -> UndoStore:
    return UndoStore.open(tmp_path, NAME, STORE, CAP)


def test_first_saved_bytes_win(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    assert w.save(1000, b"A" * 100) == 100
    # overlapping both sides: only the uncovered parts are saved
    assert w.missing(900, 300) == [(900, 100), (1100, 100)]
    assert w.save(900, b"B" * 300) == 200
    # a re-save of a covered area saves nothing
    assert w.save(1000, b"C" * 100) == 0
    w.close()
    s = _store(tmp_path)
    assert s.read(900, 300) == b"B" * 100 + b"A" * 100 + b"B" * 100
    assert list(s.coverage) == [(900, 1200)]
    with pytest.raises(ValueError, match="does not cover"):
        s.read(850, 100)
    s.close()


def test_resave_after_a_crash_keeps_the_original_bytes(tmp_path: Path) -> None:
    """A sync saved an area and began writing it when it crashed; its resume reads the area
    again (now half new bytes) and saves it: the store must keep the point's bytes."""
    replica = bytearray(b"o" * 8192)
    w = _writer(tmp_path)
    w.save(0, bytes(replica[:4096]))
    replica[:2048] = b"n" * 2048  # the write, torn by the crash
    w.close()  # killed
    w = _writer(tmp_path)  # the resume
    for e in w.missing(0, 8192):
        w.save_many([(e.start, bytes(replica[e.start : e.end]))])
    w.sync()
    w.close()
    s = _store(tmp_path)
    assert s.read(0, 8192) == b"o" * 8192
    s.close()


def test_unsynced_saves_are_not_kept(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    w.save(0, b"x" * 10)
    w.save_many([(100, b"y" * 10)])
    w.close()  # no sync: the second save was never acknowledged
    s = _store(tmp_path)
    assert list(s.coverage) == [(0, 10)]
    s.close()


def test_large_saves_are_cut_into_extents(tmp_path: Path) -> None:
    data = os.urandom(2 * MAX_EXTENT + 5)
    w = _writer(tmp_path)
    w.save(7, data)
    assert w.entries == 3
    w.close()
    s = _store(tmp_path)
    assert s.read(7, len(data)) == data
    assert s.read(MAX_EXTENT - 3, 20) == data[MAX_EXTENT - 10 : MAX_EXTENT + 10]
    s.close()


def test_outside_the_disk_is_refused(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        w.save(CAP - 1, b"xy")
    w.close()


def _three_entries(tmp_path: Path) -> list[tuple[int, bytes]]:
    rnd = random.Random(3)
    saves = [(0, rnd.randbytes(100)), (5000, rnd.randbytes(70)), (9000, rnd.randbytes(90))]
    w = _writer(tmp_path)
    for offset, data in saves:
        w.save(offset, data)
    w.close()
    return saves


def _recovered(tmp_path: Path) -> list[tuple[int, bytes]]:
    w = _writer(tmp_path)  # recovery cuts the files back
    count = w.entries
    w.save(20000, b"z" * 10)  # and appending goes on from there
    w.close()
    s = _store(tmp_path)
    got = list(s.extents())
    s.close()
    assert got[-1] == (20000, b"z" * 10)
    assert len(got) == count + 1
    return got[:-1]


def test_an_index_torn_anywhere_in_its_last_entry(tmp_path: Path) -> None:
    saves = _three_entries(tmp_path)
    _, index, _ = file_names(NAME, STORE)
    whole = (tmp_path / index).read_bytes()
    data_file = tmp_path / file_names(NAME, STORE)[0]
    data = data_file.read_bytes()
    last = len(whole) - ENTRY.size
    for cut in range(last, len(whole) + 1):
        (tmp_path / index).write_bytes(whole[:cut])
        data_file.write_bytes(data)
        want = saves if cut == len(whole) else saves[:2]
        assert _recovered(tmp_path) == want, cut
        assert data_file.stat().st_size == HEAD.size + sum(len(d) for _, d in want) + 10


def test_a_data_file_torn_anywhere_in_its_last_extent(tmp_path: Path) -> None:
    saves = _three_entries(tmp_path)
    data_name, index_name, _ = file_names(NAME, STORE)
    data = (tmp_path / data_name).read_bytes()
    index = (tmp_path / index_name).read_bytes()
    for cut in range(len(data) - len(saves[-1][1]), len(data) + 1):
        (tmp_path / data_name).write_bytes(data[:cut])
        (tmp_path / index_name).write_bytes(index)
        want = saves if cut == len(data) else saves[:2]
        assert _recovered(tmp_path) == want, cut


def test_a_bad_last_entry_or_unindexed_data_is_cut(tmp_path: Path) -> None:
    saves = _three_entries(tmp_path)
    data_name, index_name, _ = file_names(NAME, STORE)
    index = bytearray((tmp_path / index_name).read_bytes())
    index[-20] ^= 1  # a flipped bit in the last entry: its check fails
    (tmp_path / index_name).write_bytes(bytes(index))
    with (tmp_path / data_name).open("ab") as fh:
        fh.write(b"unindexed tail")  # data written, its entry never was
    assert _recovered(tmp_path) == saves[:2]


def test_seal(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    w.save(0, b"a" * 10)
    w.save_many([(50, b"b" * 10)])
    seal = w.seal("blake3tree2:65536:1048576:00", "52 8a/3")
    w.close()
    assert (seal.entries, seal.data_bytes, seal.change_id) == (2, 20, "52 8a/3")
    with pytest.raises(UndoSealed):
        _writer(tmp_path)
    s = _store(tmp_path)
    assert s.seal == seal
    assert s.read(50, 10) == b"b" * 10
    s.close()


def test_a_sealed_store_whose_index_changed_is_corrupt(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    w.save(0, b"a" * 10)
    w.save(50, b"b" * 10)
    w.seal("r", "c")
    w.close()
    index = tmp_path / file_names(NAME, STORE)[1]
    index.write_bytes(index.read_bytes()[: -ENTRY.size])  # a lost entry: not a torn tail now
    with pytest.raises(UndoCorrupt, match="seal"):
        _store(tmp_path)


def test_damaged_bytes_are_found_when_read(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    w.save(0, b"a" * 10)
    w.close()
    data = tmp_path / file_names(NAME, STORE)[0]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    s = _store(tmp_path)
    with pytest.raises(UndoCorrupt, match="checksum"):
        s.read(0, 10)
    s.close()


def test_a_foreign_index_is_refused(tmp_path: Path) -> None:
    _writer(tmp_path).close()
    other = UndoWriter.open(tmp_path, NAME, "ffff", CAP)
    other.close()
    index_name = file_names(NAME, STORE)[1]
    (tmp_path / index_name).write_bytes((tmp_path / file_names(NAME, "ffff")[1]).read_bytes())
    with pytest.raises(UndoCorrupt, match="header"):
        _writer(tmp_path)


def test_store_names() -> None:
    assert store_of(NAME, f"{NAME}.undo.abc.data") == "abc"
    assert store_of(NAME, f".{NAME}.undo.abc.seal.tmp123") == "abc"
    assert store_of(NAME, f"{NAME}.undo.abc.other") is None
    assert store_of(NAME, f"{NAME}.state") is None
    with pytest.raises(ValueError, match="bad undo store"):
        file_names(NAME, "../x")

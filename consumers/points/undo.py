"""One point's undo store: the bytes later syncs overwrote, saved durably before each overwrite.

Files (in the replica's record directory, relative to a descriptor opened with ``O_NOFOLLOW``
by :func:`consumers.copy.dirfiles.open_dir`; ``<store>`` is a random hex id the catalogue
names)::

    <name>.undo.<store>.data    HEAD, then the saved old bytes, appended extent after extent
    <name>.undo.<store>.index   HEAD, then one 64-byte ENTRY per extent, in append order
    <name>.undo.<store>.seal    JSON written atomically once the point is complete (sealed)

    HEAD  = magic (8) | u64be capacity | tag (16: the store's id, so a data file and an index
            of different stores are never paired)
    ENTRY = u64be disk offset | u64be length | u64be position in the data file
            | blake3(the extent's bytes) (32) | u64be check
    check = the first 8 bytes of blake3(tag || the 56 bytes before it), big-endian

Rules every intact index keeps (:func:`scan` stops at the first entry that breaks one): the
check matches; extents are appended back to back (the first at ``HEAD.size``, each next at the
previous position + length), so the data file's valid length follows from the index; an extent
lies inside the disk, is at most :data:`MAX_EXTENT` bytes, lies inside the data file, and
overlaps no earlier extent of the store.

**Durability.** :meth:`UndoWriter.sync` fsyncs the data file *first*, then writes the pending
index entries and fsyncs the index. So an intact index entry always names durable data, and a
crash anywhere leaves an index that is a valid prefix followed by at most a torn or unsynced
tail (a partial entry, an entry whose check fails, or one whose data lies past the end of the
data file), plus perhaps data bytes past the last entry. Opening the store for writing cuts
both files back to the valid prefix. Nothing in the cut tail was acknowledged (``sync`` had not
returned), so the caller had not started the replica writes it was to protect.

**First saved bytes win.** A store keeps, for each byte of the disk, the *first* bytes saved for
it; a later save of an area already covered saves only the uncovered parts
(:meth:`UndoWriter.missing` says which those are, so the caller reads only them from the
replica). Why: the caller writes an area of the replica only after the old bytes of that area
are durable here, so a byte this store does not cover has not been overwritten since the point
was taken, and the replica still holds the point's byte there; but a covered byte may have been
overwritten (in full, in part, or torn by a crash mid-write), so after a crash and resume the
replica's bytes there are *not* the point's any more. Re-saving them would replace the point's
bytes by the sync's half-written ones. The rule holds whichever sync writes next (the resume of
the interrupted sync, or a full copy the fence allows instead): all of them start from the same
point.

**Sealed.** :meth:`UndoWriter.seal` syncs and then writes the seal (atomic: temp, fsync,
rename, fsync of the directory) with the number of entries, the data length, the blake3 of the
index and the point's root digest and change ID. A sealed store is immutable; opening one whose
index no longer matches its seal raises :class:`UndoCorrupt`. Extent bytes are checked against
their entry's blake3 whenever they are read (:meth:`UndoStore.read`, :meth:`UndoStore.extents`).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cbtstream.errors import CbtStreamError
from cbtstream.extents import Extent
from consumers.copy.dirfiles import open_dir, read_file, unlink_synced, write_atomic
from consumers.points.coverage import Coverage

DATA_MAGIC = b"CBTUNDD1"
INDEX_MAGIC = b"CBTUNDI1"
HEAD = struct.Struct(">8sQ16s")
ENTRY = struct.Struct(">QQQ32sQ")
_BODY = struct.Struct(">QQQ32s")
#: Largest extent of one entry: a saved area is cut into pieces of at most this size, so a read
#: verifies at most 1 MiB to serve a 64 KiB leaf, and a torn tail costs at most this much.
MAX_EXTENT = 1 << 20
#: A seal is a few hundred bytes.
_MAX_SEAL = 1 << 16


class UndoCorrupt(CbtStreamError):
    """An undo store is damaged (not a torn tail a crash can leave): its point cannot be read."""

    reason = "undo_corrupt"


class UndoSealed(CbtStreamError):
    """A sealed undo store was opened for writing (its point is complete: it never changes)."""

    reason = "undo_sealed"


@dataclass(frozen=True, slots=True)
class Entry:
    """One saved extent: ``length`` old bytes of disk ``offset``, at ``position`` in the data."""

    offset: int
    length: int
    position: int
    digest: bytes

    @property
    def end(self) -> int:
        return self.offset + self.length


class Seal(BaseModel):
    """What a complete store holds (the ``.seal`` file's body)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str
    entries: int = Field(ge=0)
    data_bytes: int = Field(ge=0)
    index_blake3: str
    #: The hash tree root and change ID of the point this store restores.
    root_digest: str
    change_id: str


def file_names(name: str, store: str) -> tuple[str, str, str]:
    """(data, index, seal) file names of store ``store`` of the replica record ``name``."""
    if not store.isalnum():
        raise ValueError(f"bad undo store id {store!r}")
    base = f"{name}.undo.{store}"
    return f"{base}.data", f"{base}.index", f"{base}.seal"


def store_of(name: str, entry: str) -> str | None:
    """The store id a directory entry belongs to (temp files of atomic writes included), or
    None if it is not an undo file of ``name``."""
    if entry.startswith("."):
        entry = entry[1:].rsplit(".tmp", 1)[0]
    prefix = f"{name}.undo."
    if not entry.startswith(prefix):
        return None
    store, _, kind = entry[len(prefix):].partition(".")
    return store if kind in ("data", "index", "seal") and store.isalnum() else None


def tag_of(store: str) -> bytes:
    """The 16-byte tag of a store id (the id's blake3: any id length works)."""
    return blake3.blake3(store.encode()).digest(16)


def pack_entry(tag: bytes, entry: Entry) -> bytes:
    body = _BODY.pack(entry.offset, entry.length, entry.position, entry.digest)
    return body + blake3.blake3(tag + body).digest(8)


def scan(index: bytes, data_size: int, tag: bytes, capacity: int) -> list[Entry]:
    """The entries of the valid prefix of ``index`` (the whole index file's bytes, header
    included) for a data file of ``data_size`` bytes (pure; see the module docstring for the
    rules). Raises :class:`UndoCorrupt` if the header is not this store's."""
    if len(index) < HEAD.size or HEAD.unpack_from(index) != (INDEX_MAGIC, capacity, tag):
        raise UndoCorrupt("the undo index's header is not this store's")
    entries: list[Entry] = []
    seen = Coverage()
    position = HEAD.size
    for at in range(HEAD.size, len(index) - ENTRY.size + 1, ENTRY.size):
        raw = index[at : at + ENTRY.size]
        offset, length, pos, digest = _BODY.unpack_from(raw)
        if (blake3.blake3(tag + raw[: _BODY.size]).digest(8) != raw[_BODY.size :]
                or pos != position or not 0 < length <= MAX_EXTENT
                or offset + length > capacity or pos + length > data_size
                or seen.overlap(offset, offset + length)):
            break
        entries.append(Entry(offset, length, pos, digest))
        seen.add(offset, offset + length)
        position += length
    return entries


def _pwrite_all(fd: int, data: bytes | memoryview, position: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, position)
        view, position = view[n:], position + n


def _pread_exact(fd: int, length: int, position: int) -> bytes:
    data = os.pread(fd, length, position)
    if len(data) != length:
        raise UndoCorrupt(f"the undo data ends before byte {position + length}")
    return data


def _open_rw(dir_fd: int, file: str) -> int:
    return os.open(file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def read_seal(dir_fd: int, seal_file: str) -> Seal | None:
    """The store's seal, None if it has none; :class:`UndoCorrupt` if it is damaged."""
    try:
        raw = read_file(dir_fd, seal_file, _MAX_SEAL)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UndoCorrupt(f"cannot read the undo seal {seal_file}: {exc}") from exc
    try:
        doc = json.loads(raw)
        body = doc["seal"]
        canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if blake3.blake3(canon).hexdigest() != doc["blake3"]:
            raise UndoCorrupt(f"the undo seal {seal_file} is torn or edited")
        return Seal.model_validate(body)
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise UndoCorrupt(f"the undo seal {seal_file} does not parse") from exc


def _encode_seal(seal: Seal) -> bytes:
    body = seal.model_dump(mode="json")
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({"seal": body, "blake3": blake3.blake3(canon).hexdigest()},
                      sort_keys=True).encode() + b"\n"


class UndoWriter:
    """Appends the old bytes of areas about to be overwritten to one point's store, durably,
    the first saved bytes winning (see the module docstring). Not thread-safe; after an
    ``OSError`` the writer refuses further work: open the store again (which recovers it)."""

    def __init__(self, dir_fd: int, name: str, store: str, capacity: int, data_fd: int,
                 index_fd: int, entries: list[Entry], index_bytes: bytes) -> None:
        self._dir_fd = dir_fd
        self.store = store
        self.capacity = capacity
        self._files = file_names(name, store)
        self._tag = tag_of(store)
        self._data_fd = data_fd
        self._index_fd = index_fd
        self.coverage = Coverage((e.offset, e.end) for e in entries)
        self.entries = len(entries)
        self._data_end = entries[-1].position + entries[-1].length if entries else HEAD.size
        self._index_end = HEAD.size + len(entries) * ENTRY.size
        self._hasher = blake3.blake3(index_bytes[HEAD.size :])  # the entries
        self._pending: list[bytes] = []
        self._broken = False

    @classmethod
    def open(cls, directory: Path, name: str, store: str, capacity: int) -> UndoWriter:
        """Create store ``store`` or open it to go on (a resumed sync), cutting a torn tail.
        Raises :class:`UndoSealed` if it is sealed, :class:`UndoCorrupt` if it is damaged."""
        data_file, index_file, seal_file = file_names(name, store)
        tag = tag_of(store)
        dir_fd = open_dir(directory, create=True)
        fds: list[int] = []
        try:
            if read_seal(dir_fd, seal_file) is not None:
                raise UndoSealed(f"undo store {store} is sealed")
            try:
                os.stat(index_file, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                # data first: an index never exists without its data file
                write_atomic(dir_fd, data_file, HEAD.pack(DATA_MAGIC, capacity, tag))
                write_atomic(dir_fd, index_file, HEAD.pack(INDEX_MAGIC, capacity, tag))
            fds.append(_open_rw(dir_fd, data_file))
            fds.append(_open_rw(dir_fd, index_file))
            data_fd, index_fd = fds
            if _pread_exact(data_fd, HEAD.size, 0) != HEAD.pack(DATA_MAGIC, capacity, tag):
                raise UndoCorrupt(f"the undo data's header is not store {store}'s")
            index = _read_all(index_fd)
            entries = scan(index, os.fstat(data_fd).st_size, tag, capacity)
            valid_index = HEAD.size + len(entries) * ENTRY.size
            valid_data = entries[-1].position + entries[-1].length if entries else HEAD.size
            if len(index) != valid_index or os.fstat(data_fd).st_size != valid_data:
                os.ftruncate(index_fd, valid_index)
                os.ftruncate(data_fd, valid_data)
                os.fsync(index_fd)
                os.fsync(data_fd)
            return cls(dir_fd, name, store, capacity, data_fd, index_fd, entries,
                       index[:valid_index])
        except BaseException:
            for fd in (*fds, dir_fd):
                os.close(fd)
            raise

    @property
    def data_bytes(self) -> int:
        """Saved bytes (acknowledged or not)."""
        return self._data_end - HEAD.size

    def missing(self, offset: int, length: int) -> list[Extent]:
        """The parts of an area not saved yet: what to read from the replica and save before
        writing the area."""
        return [Extent(s, e - s) for s, e in self.coverage.missing(offset, offset + length)]

    def save_many(self, items: Iterable[tuple[int, bytes | memoryview]]) -> int:
        """Append the old bytes of each ``(offset, bytes)`` area where the store has none yet;
        durable only once :meth:`sync` returns. Returns the bytes appended."""
        self._check()
        added = 0
        try:
            for offset, old in items:
                view = memoryview(old).cast("B")
                if offset < 0 or offset + len(view) > self.capacity:
                    raise ValueError(f"area {offset}+{len(view)} outside the disk")
                for start, end in self.coverage.missing(offset, offset + len(view)):
                    for s in range(start, end, MAX_EXTENT):
                        piece = view[s - offset : min(end, s + MAX_EXTENT) - offset]
                        added += self._append(s, piece)
        except OSError:
            self._broken = True
            raise
        return added

    def _append(self, offset: int, piece: memoryview) -> int:
        _pwrite_all(self._data_fd, piece, self._data_end)
        entry = Entry(offset, len(piece), self._data_end, blake3.blake3(piece).digest())
        self._pending.append(pack_entry(self._tag, entry))
        self._data_end += len(piece)
        self.coverage.add(offset, entry.end)
        return len(piece)

    def sync(self) -> None:
        """Make every save so far durable: the data, then the index entries naming it."""
        self._check()
        if not self._pending:
            return
        try:
            os.fsync(self._data_fd)
            entries = b"".join(self._pending)
            _pwrite_all(self._index_fd, entries, self._index_end)
            os.fsync(self._index_fd)
        except OSError:
            self._broken = True
            raise
        self._hasher.update(entries)
        self._index_end += len(entries)
        self.entries += len(self._pending)
        self._pending.clear()

    def save(self, offset: int, old: bytes | memoryview) -> int:
        """Save one area's old bytes (where not saved yet), durable when this returns."""
        added = self.save_many([(offset, old)])
        self.sync()
        return added

    def seal(self, root_digest: str, change_id: str) -> Seal:
        """Sync and seal the store: its point (``root_digest``, ``change_id``) is complete."""
        self.sync()
        seal = Seal(store=self.store, entries=self.entries, data_bytes=self.data_bytes,
                    index_blake3=self._hasher.hexdigest(), root_digest=root_digest,
                    change_id=change_id)
        write_atomic(self._dir_fd, self._files[2], _encode_seal(seal))
        self._broken = True  # sealed: no more saves
        return seal

    def _check(self) -> None:
        if self._broken or self._data_fd < 0:
            raise ValueError(f"undo store {self.store} is closed, sealed or failed: reopen it")

    def close(self) -> None:
        """Close the files; unsynced saves are dropped (safe twice)."""
        for fd in (self._data_fd, self._index_fd, self._dir_fd):
            if fd >= 0:
                os.close(fd)
        self._data_fd = self._index_fd = self._dir_fd = -1
        self._pending.clear()


class UndoStore:
    """One store opened for reading: its coverage, and its extents' bytes checked as read."""

    def __init__(self, store: str, data_fd: int, entries: list[Entry], seal: Seal | None
                 ) -> None:
        self.store = store
        self.seal = seal
        self._data_fd = data_fd
        self._order = entries
        self._by_offset = sorted(entries, key=lambda e: e.offset)
        self._starts = [e.offset for e in self._by_offset]
        self.coverage = Coverage((e.offset, e.end) for e in self._by_offset)
        self.data_bytes = sum(e.length for e in entries)
        #: The last extent read and checked: reads in leaf-sized chunks check each one once.
        self._cached: tuple[Entry, bytes] | None = None

    @classmethod
    def open(cls, directory: Path, name: str, store: str, capacity: int) -> UndoStore:
        """Open a store read-only: a sealed one must match its seal; an unsealed one (a sync
        is writing it, or was) is read up to its valid prefix."""
        data_file, index_file, seal_file = file_names(name, store)
        tag = tag_of(store)
        dir_fd = open_dir(directory, create=False)
        try:
            seal = read_seal(dir_fd, seal_file)
            try:
                index_fd = os.open(index_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   dir_fd=dir_fd)
            except FileNotFoundError:
                if seal is not None:
                    raise UndoCorrupt(f"undo store {store} lost its index") from None
                return cls(store, -1, [], None)  # begun, nothing saved yet
            try:
                index = _read_all(index_fd)
            finally:
                os.close(index_fd)
            data_fd = os.open(data_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=dir_fd)
        except FileNotFoundError as exc:
            raise UndoCorrupt(f"undo store {store} lost a file: {exc.filename}") from exc
        finally:
            os.close(dir_fd)
        try:
            if _pread_exact(data_fd, HEAD.size, 0) != HEAD.pack(DATA_MAGIC, capacity, tag):
                raise UndoCorrupt(f"the undo data's header is not store {store}'s")
            entries = scan(index, os.fstat(data_fd).st_size, tag, capacity)
            if seal is not None:
                valid = index[: HEAD.size + len(entries) * ENTRY.size]
                if (len(entries) != seal.entries or len(valid) != len(index)
                        or blake3.blake3(valid[HEAD.size :]).hexdigest() != seal.index_blake3
                        or seal.store != store):
                    raise UndoCorrupt(f"undo store {store} does not match its seal")
        except BaseException:
            os.close(data_fd)
            raise
        return cls(store, data_fd, entries, seal)

    def _entry_bytes(self, entry: Entry) -> bytes:
        if self._cached is not None and self._cached[0] is entry:
            return self._cached[1]
        data = _pread_exact(self._data_fd, entry.length, entry.position)
        if blake3.blake3(data).digest() != entry.digest:
            raise UndoCorrupt(f"undo store {self.store}: the saved bytes of "
                              f"{entry.offset}+{entry.length} do not match their checksum")
        self._cached = (entry, data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        """The saved bytes of ``[offset, offset + length)``, which the store must cover."""
        out = bytearray()
        pos, end = offset, offset + length
        i = bisect_right(self._starts, pos) - 1
        while pos < end:
            if i < 0 or i >= len(self._by_offset) or not (
                    self._by_offset[i].offset <= pos < self._by_offset[i].end):
                raise ValueError(f"undo store {self.store} does not cover byte {pos}")
            entry = self._by_offset[i]
            stop = min(end, entry.end)
            out += self._entry_bytes(entry)[pos - entry.offset : stop - entry.offset]
            pos = stop
            i += 1
        return bytes(out)

    def extents(self) -> Iterator[tuple[int, bytes]]:
        """Every saved extent ``(offset, bytes)``, checked, in the order they were saved."""
        for entry in self._order:
            yield entry.offset, self._entry_bytes(entry)

    def close(self) -> None:
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1


def delete_store(directory: Path, name: str, store: str) -> None:
    """Remove a store's files durably: the seal first, so a crash midway leaves an unsealed
    remnant the catalogue no longer names (removed by the next garbage collection)."""
    for file in reversed(file_names(name, store)):
        with contextlib.suppress(OSError):
            unlink_synced(directory, file)

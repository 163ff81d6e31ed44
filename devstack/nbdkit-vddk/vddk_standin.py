#!/usr/sbin/nbdkit python
# A stand-in for nbdkit's VDDK plugin (nbdkit-vddk-plugin(1)), for tests without VMware.
#
# Debian 12 does not ship the vddk plugin and VDDK itself is proprietary, so cbtstream tests
# its production export path (copier.exports = "vddk") with this script, run by Debian's
# nbdkit-plugin-python exactly where the real plugin would run:
#
#     nbdkit [options] python vddk_standin.py server=... user=... password=-3 ...
#
# It behaves like the real plugin wherever cbtstream can get it wrong:
#
# * it accepts exactly the parameters nbdkit-vddk-plugin(1) documents, refusing unknown ones
#   ("unknown parameter 'x'") and a remote connection without server, user, password or vm
#   ("remote connection requested, missing parameter: ..."), as the real plugin does at
#   config time;
# * it is stricter than the real plugin where cbtstream promises more: the password must come
#   by file (password=+FILE) or inherited descriptor (password=-FD), never on the command line;
#   the thumbprint must be given, as 20 uppercase hex pairs joined by ':'; vm= must be
#   moref=ID; transports must be a ':'-list of known modes;
# * like VDDK it connects only when an NBD client connects (open): it opens TLS to
#   server:port, compares the SHA-1 of the certificate presented with thumbprint= (VDDK's trust
#   model: no CA check, the thumbprint is the pin) and logs in with user and password (a real
#   SOAP Login, so wrong credentials fail);
# * it then opens the disk named by vm=moref=, snapshot= and file= (the backing fileName in
#   the snapshot's config): it asks the simulator's side channel (GET /cbt/vddk/disk) which
#   frozen snapshot image that is, over the same pinned TLS, and serves it read-only, with
#   extents (holes reported from SEEK_HOLE), and, like VDDK, only on 512-byte sectors.
#
# Nothing here is copied from nbdkit's or CDI's sources; messages imitate the real plugin's so
# that the resolver's error handling is exercised on realistic text.

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import ssl
import urllib.parse
from typing import Any
from xml.sax.saxutils import escape

import nbdkit

API_VERSION = 2

#: Every parameter nbdkit-vddk-plugin(1) documents (nbdkit 1.32 to 1.4x).
DOCUMENTED = frozenset({
    "compression", "config", "cookie", "create", "create-adapter-type", "create-hwversion",
    "create-size", "create-type", "file", "libdir", "nfchostport", "password", "port",
    "server", "single-link", "snapshot", "thumbprint", "transports", "unbuffered", "user",
    "vimapiver", "vm",
})
COMPRESSION = ("none", "zlib", "fastlz", "skipz")
TRANSPORT_MODES = ("file", "san", "hotadd", "nbdssl", "nbd")
#: Transports a VDDK session from a host outside the ESXi cluster can use: network copies.
NETWORK_MODES = ("nbdssl", "nbd")
THUMBPRINT = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){19}$")
DEFAULT_LIBDIR = "/usr/lib/vmware-vix-disklib"
SECTOR = 512

params: dict[str, str] = {}
password: str | None = None


def _fail(message: str) -> None:
    raise RuntimeError(message)


def _read_password(value: str) -> str:
    """The password as nbdkit_read_password would read it, but only from a file or an fd."""
    if value.startswith("+"):
        try:
            with builtins.open(value[1:], encoding="utf-8") as f:  # `open` is nbdkit's callback
                text = f.read()
        except OSError as exc:
            _fail(f"open {value[1:]}: {exc.strerror}")
    elif re.fullmatch(r"-[0-9]+", value):
        fd = int(value[1:])
        chunks = []
        try:
            while True:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError as exc:
            _fail(f"reading password from file descriptor {fd}: {exc.strerror}")
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        text = b"".join(chunks).decode("utf-8")
    else:
        _fail("password must be given as password=+FILE or password=-FD (this stand-in refuses "
              "passwords on the command line and interactive prompts)")
    return text[:-1] if text.endswith("\n") else text


def config(key: str, value: str) -> None:
    global password
    if key not in DOCUMENTED:
        _fail(f"unknown parameter '{key}'")
    if key == "password":
        password = _read_password(value)
        params[key] = "(read)"
        return
    if key == "compression" and value not in COMPRESSION:
        _fail(f"unknown compression type: {value}")
    if key in ("port", "nfchostport") and not (value.isdigit() and 0 < int(value) < 65536):
        _fail(f"could not parse {key}: {value}")
    if key == "libdir" and not os.path.isdir(value):
        _fail(f"realpath: {value}: No such file or directory")
    if key == "config" and not os.access(value, os.R_OK):
        _fail(f"config file {value} cannot be read")
    if key == "create" and value.lower() in ("1", "true", "on", "yes"):
        _fail("this stand-in serves snapshot disks read-only: create=true is not supported")
    params[key] = value


def config_complete() -> None:
    if "file" not in params:
        _fail("you must supply the file=<FILENAME> parameter after the plugin name on the "
              "command line")
    remote = any(k in params for k in ("vm", "server", "user", "cookie", "thumbprint", "port",
                                       "nfchostport")) or password is not None
    if not remote:
        _fail("this stand-in serves only remote disks (server=, vm=...)")
    given = set(params) | ({"password"} if password is not None else set())
    for needed in ("server", "user", "password", "vm"):
        if needed not in given:
            _fail(f"remote connection requested, missing parameter: {needed}")
    thumb = params.get("thumbprint")
    if thumb is None:
        _fail("thumbprint= is required by this stand-in (cbtstream always pins the server)")
    elif not THUMBPRINT.match(thumb):
        _fail(f"thumbprint {thumb!r} is not a SHA-1 fingerprint (20 uppercase hex pairs "
              "joined by ':')")
    if not params["vm"].startswith("moref=") or len(params["vm"]) == len("moref="):
        _fail(f"vm={params['vm']}: this stand-in only understands vm=moref=ID")
    modes = params.get("transports", "nbdssl:nbd").split(":")
    for mode in modes:
        if mode not in TRANSPORT_MODES:
            _fail(f"unknown transport mode {mode!r} in transports=")
    if "snapshot" not in params:
        _fail("snapshot= is required by this stand-in (it serves snapshot disks only)")


def dump_plugin() -> None:
    print(f"vddk_default_libdir={DEFAULT_LIBDIR}")
    print("vddk_has_nfchostport=1")
    print("vddk_library_version=8")
    print("vddk_standin=1")


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


class _Session:
    """One pinned TLS connection to the server: what VixDiskLib_ConnectEx would hold."""

    def __init__(self) -> None:
        self.host = params["server"]
        self.port = int(params.get("port", "443"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # VDDK's trust is the thumbprint, checked below
        self.conn = http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=30)
        try:
            self.conn.connect()
        except OSError as exc:
            _fail(f"VixDiskLib_ConnectEx: Cannot connect to host {self.host}:{self.port}: {exc}")
        sock = self.conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True) or b""
        actual = ":".join(f"{b:02X}" for b in hashlib.sha1(der).digest())
        if actual != params["thumbprint"]:
            self.conn.close()
            nbdkit.debug(f"VixDiskLibVim: Failed to verify SSL certificate: actual "
                         f"thumbprint={actual} expected={params['thumbprint']}")
            _fail(f"VixDiskLib_Open: {params['file']}: Unknown error. Please verify whether "
                  f"the \"thumbprint\" parameter ({params['thumbprint']}) matches the SHA1 "
                  "fingerprint of the remote VMware server. Refer to nbdkit-vddk-plugin(1) "
                  "section \"THUMBPRINTS\" for details.")
        self.cookie = ""

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        hdrs = dict(headers or {})
        if self.cookie:
            hdrs["Cookie"] = self.cookie
        self.conn.request(method, path, body=body, headers=hdrs)
        resp = self.conn.getresponse()
        return resp.status, resp.read(), resp

    def soap(self, method: str, inner: str) -> tuple[int, bytes]:
        envelope = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
            'xmlns:urn="urn:vim25"><soapenv:Body>'
            f"<urn:{method}>{inner}</urn:{method}>"
            "</soapenv:Body></soapenv:Envelope>"
        ).encode()
        status, data, resp = self.request("POST", "/sdk", envelope, {
            "Content-Type": "text/xml; charset=utf-8", "SOAPAction": "urn:vim25/8.0"})
        cookie = resp.getheader("Set-Cookie")
        if cookie:
            self.cookie = cookie.split(";", 1)[0]
        return status, data

    def login(self) -> None:
        assert password is not None
        status, data = self.soap("Login", (
            '<urn:_this type="SessionManager">SessionManager</urn:_this>'
            f"<urn:userName>{escape(params['user'])}</urn:userName>"
            f"<urn:password>{escape(password)}</urn:password>"))
        if status != 200 or b"Fault" in data:
            _fail(f"VixDiskLib_ConnectEx: Cannot connect to host {self.host}: login failed for "
                  f"user {params['user']}")

    def logout(self) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            self.soap("Logout", '<urn:_this type="SessionManager">SessionManager</urn:_this>')
        self.conn.close()


class _Disk:
    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size


def open(readonly: bool) -> _Disk:
    modes = params.get("transports", "nbdssl:nbd").split(":")
    usable = [m for m in modes if m in NETWORK_MODES]
    if not usable:
        _fail(f"VixDiskLib_Open: {params['file']}: no transport mode of {':'.join(modes)} is "
              "available to this host (san/hotadd/file need a proxy inside the cluster)")
    session = _Session()
    try:
        session.login()
        query = urllib.parse.urlencode({"vm": params["vm"][len("moref="):],
                                        "snapshot": params["snapshot"], "file": params["file"]})
        status, data, _ = session.request("GET", f"/cbt/vddk/disk?{query}")
    finally:
        session.logout()
    if status == 404:
        _fail(f"VixDiskLib_Open: {params['file']}: The system cannot find the file specified "
              f"(vm={params['vm']} snapshot={params['snapshot']})")
    if status != 200:
        _fail(f"VixDiskLib_Open: {params['file']}: server answered {status}")
    doc = json.loads(data)
    nbdkit.debug(f"transport mode: {usable[0]}")
    try:
        fd = os.open(doc["image"], os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        _fail(f"VixDiskLib_Open: {params['file']}: {exc.strerror}")
    size = os.fstat(fd).st_size
    if size != int(doc["capacity"]):
        os.close(fd)
        _fail(f"VixDiskLib_Open: {params['file']}: image has {size} bytes, the disk "
              f"{doc['capacity']}")
    return _Disk(fd, size)


def close(h: _Disk) -> None:
    os.close(h.fd)


def get_size(h: _Disk) -> int:
    return h.size


def can_write(h: _Disk) -> bool:
    return False


def can_multi_conn(h: _Disk) -> bool:
    return False


def can_extents(h: _Disk) -> bool:
    return True


def _sector_check(count: int, offset: int) -> None:
    if offset % SECTOR or count % SECTOR:
        nbdkit.set_error(errno.EINVAL)
        _fail(f"read count ({count}) and offset ({offset}) must be multiples of {SECTOR}")


def pread(h: _Disk, buf: bytearray, offset: int, flags: int) -> None:
    _sector_check(len(buf), offset)
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(h.fd, [view[done:]], offset + done)
        if n <= 0:
            nbdkit.set_error(errno.EIO)
            _fail(f"short read at {offset + done}")
        done += n


def extents(h: _Disk, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    """Data and holes of the frozen image (VDDK's QueryAllocatedBlocks, by SEEK_DATA/HOLE)."""
    end = min(offset + count, h.size)
    out: list[tuple[int, int, int]] = []
    pos = offset
    hole = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    while pos < end:
        try:
            data = os.lseek(h.fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = h.size
        if data > pos:
            out.append((pos, min(data, end) - pos, hole))
            pos = min(data, end)
            continue
        nxt = os.lseek(h.fd, pos, os.SEEK_HOLE)
        out.append((pos, min(nxt, end) - pos, 0))
        pos = min(nxt, end)
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return out


"""The nbdkit command line for one snapshot disk, and what nbdkit's answers mean (pure).

One process per (disk, VM snapshot)::

    nbdkit --exit-with-parent --readonly --pidfile=RUN/nbdkit.pid --unix=RUN/nbd.sock
           --filter=retry --filter=cacheextents
           vddk server=HOST [port=PORT] user=USER password=-FD|+FILE thumbprint=AA:BB:...
           vm=moref=VM snapshot=SNAPSHOT transports=nbdssl:nbd
           [libdir=DIR] [config=FILE] [compression=MODE] file=[datastore] dir/disk.vmdk

Why each piece:

* ``--readonly``: a snapshot disk is only ever read; VDDK then opens it read-only too.
* ``--exit-with-parent`` (implies ``--foreground``): if the copier dies, even by SIGKILL, the
  kernel signals nbdkit (``PR_SET_PDEATHSIG``), so no VDDK session outlives its copier.
* ``--pidfile``: nbdkit writes it once its socket accepts connections: the readiness signal.
* ``--unix``: a socket in a private 0700 folder; a 127.0.0.1 port would serve the VM's disk to
  every local user.
* ``retry`` reopens the VDDK handle after a transient NFC error; ``cacheextents`` keeps VDDK's
  slow QueryAllocatedBlocks answers (virt-v2v and CDI use both).
* the password is ``-FD`` (a pipe the copier wrote and closed) or ``+FILE`` (read by nbdkit):
  never the secret itself, so neither ``ps`` nor a log shows it.
* ``file=`` is the backing fileName of the device in the **snapshot's** config, and goes last
  (it contains a space; argv needs no quoting).

A Python plugin script (``*.py``, the project's stand-in) is run as ``nbdkit python SCRIPT``;
everything else is identical, so the tests run the production command line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cbtstream.config import VddkSettings
from cbtstream.errors import CbtStreamError
from consumers.vddk.errors import (
    VddkLoginFailed,
    VddkPasswordError,
    VddkStartFailed,
    VddkThumbprintMismatch,
    VddkUnavailable,
)

#: Filters every VDDK export runs with (nbdkit-retry-filter(1), nbdkit-cacheextents-filter(1)).
FILTERS = ("retry", "cacheextents")


@dataclass(frozen=True)
class VddkDisk:
    """What VDDK opens: one disk of one VM snapshot, on one server."""

    server: str
    port: int | None
    user: str
    thumbprint: str
    vm_moref: str
    snapshot_moref: str
    #: ``[datastore] dir/disk.vmdk``, from the snapshot's config.
    file: str


def plugin_argv(plugin: str) -> list[str]:
    """The plugin words of the command line: ``vddk``, ``/path/plugin.so``, or ``python
    /path/script.py``."""
    if plugin.endswith(".py"):
        return ["python", str(Path(plugin).resolve())]
    return [plugin]


def nbdkit_argv(settings: VddkSettings, disk: VddkDisk, *, password_arg: str, socket: Path,
                pidfile: Path) -> list[str]:
    """The full argv (see the module docstring). ``password_arg`` is ``-FD`` or ``+FILE``."""
    if not re.fullmatch(r"-[0-9]+|\+/.+", password_arg):
        raise ValueError("the password reaches nbdkit only as -FD or +/absolute/file")
    argv = [settings.nbdkit, "--exit-with-parent", "--readonly", f"--pidfile={pidfile}",
            f"--unix={socket}", *(f"--filter={f}" for f in FILTERS),
            *plugin_argv(settings.plugin), f"server={disk.server}"]
    if disk.port is not None and disk.port != 443:
        argv.append(f"port={disk.port}")
    argv += [f"user={disk.user}", f"password={password_arg}",
             f"thumbprint={disk.thumbprint.upper()}", f"vm=moref={disk.vm_moref}",
             f"snapshot={disk.snapshot_moref}", f"transports={settings.transports}"]
    if settings.libdir is not None:
        argv.append(f"libdir={settings.libdir}")
    if settings.config is not None:
        argv.append(f"config={settings.config}")
    if settings.compression is not None:
        argv.append(f"compression={settings.compression}")
    argv.append(f"file={disk.file}")
    return argv


def dump_plugin_argv(settings: VddkSettings) -> list[str]:
    """``nbdkit --filter=... <plugin> [libdir=...] --dump-plugin``: loads the plugin, the
    filters and (the real plugin) the VDDK library, serving nothing."""
    argv = [settings.nbdkit, *(f"--filter={f}" for f in FILTERS), *plugin_argv(settings.plugin)]
    if settings.libdir is not None:
        argv.append(f"libdir={settings.libdir}")
    return [*argv, "--dump-plugin"]


def check_dump(settings: VddkSettings, returncode: int, output: str) -> dict[str, str]:
    """The ``key=value`` lines of ``--dump-plugin``, or :class:`VddkUnavailable` naming what is
    missing: nbdkit, the plugin, a filter, or the VDDK library (the real plugin omits
    ``vddk_library_version`` when it cannot load ``libvixDiskLib.so``)."""
    if returncode != 0:
        text = error_text(output)
        if "cannot open plugin" in text or ("cannot open file" in text and ".so" in text):
            raise VddkUnavailable(
                f"nbdkit cannot load the plugin {settings.plugin!r}: {text}. The vddk plugin is "
                "not in Debian 12's nbdkit: build nbdkit's plugins/vddk (see README, 'Reading "
                "VMware disks') or set copier.vddk.plugin to its path")
        if "cannot open filter" in text:
            raise VddkUnavailable(f"nbdkit cannot load the retry/cacheextents filters: {text} "
                                  "(install Debian's nbdkit 1.32 or later)")
        raise VddkUnavailable(f"nbdkit {settings.plugin} --dump-plugin failed: {text}")
    info = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    if "vddk_default_libdir" not in info:
        raise VddkUnavailable(f"the nbdkit plugin {settings.plugin!r} is not a vddk plugin "
                              "(no vddk_default_libdir in --dump-plugin)")
    if "vddk_library_version" not in info:
        where = settings.libdir or info.get("vddk_default_libdir")
        raise VddkUnavailable(
            f"the vddk plugin cannot load VMware's VDDK library (libvixDiskLib.so) from {where}: "
            "download VDDK from Broadcom, unpack it and set copier.vddk.libdir to the "
            "vmware-vix-disklib-distrib folder")
    return info


def error_text(stderr: str, limit: int = 600) -> str:
    """The meaningful lines of nbdkit's stderr: its ``error:`` lines and an exception's last
    line (a Python plugin prints tracebacks), without the traceback itself."""
    keep: list[str] = []
    for raw in stderr.splitlines():
        line = raw.strip()
        if not line or line.startswith(("File ", "^", "raise ", "_fail(")) or \
                "Traceback (most recent call last)" in line:
            continue
        if "error:" in line or re.match(r"^[A-Za-z_.]+(Error|Exception): ", line):
            keep.append(re.sub(r"^(RuntimeError|Exception): ", "", line))
    text = " | ".join(dict.fromkeys(keep)) or stderr.strip()[-limit:]
    return text[:limit]


def classify(stderr: str, what: str) -> CbtStreamError:
    """The error nbdkit's stderr describes (at start-up or when the probe connected)."""
    text = error_text(stderr)
    msg = f"{what}: {text}"
    low = text.lower()
    if "thumbprint" in low:
        return VddkThumbprintMismatch(msg)
    if "password" in low:
        return VddkPasswordError(msg)
    if "login failed" in low or "cannot complete login" in low or "incorrect user" in low:
        return VddkLoginFailed(msg)
    if ("cannot open plugin" in low or "cannot open filter" in low or "unknown parameter" in low
            or "missing parameter" in low or "libvixdisklib" in low):
        return VddkUnavailable(msg)
    if "cannot find the file" in low or "not found" in low:
        from consumers.exports import ExportNotFound

        return ExportNotFound(msg)
    return VddkStartFailed(msg)


def render(argv: Sequence[str]) -> str:
    """The command line as logged and documented (it carries no secret by construction)."""
    import shlex

    return " ".join(shlex.quote(a) for a in argv)

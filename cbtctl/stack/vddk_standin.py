"""The stand-in for nbdkit's vddk plugin (``devstack/nbdkit-vddk/vddk_standin.py``) as part of
the local stack.

Debian 12 ships neither the vddk plugin nor VDDK, so the stack installs Debian's
``nbdkit-plugin-python`` (with the other system tools) and checks here that nbdkit loads the
stand-in together with the filters every VDDK export uses, exactly as the copier checks the
real plugin at start-up. The local pipeline (``make demo``, the end-to-end tests) then runs
``copier.exports = "vddk"`` with ``copier.vddk.plugin`` set to :data:`STAND_IN`.
"""

from __future__ import annotations

from pathlib import Path

from cbtctl.stack import system
from cbtstream.config import VddkSettings
from cbtstream.errors import StackError
from consumers.vddk.command import check_dump, dump_plugin_argv

#: The stand-in plugin script (source checkouts; not shipped in wheels).
STAND_IN = Path(__file__).resolve().parents[2] / "devstack" / "nbdkit-vddk" / "vddk_standin.py"


def install() -> Path:
    """Make sure nbdkit loads the stand-in; return its path."""
    system.ensure_tools([system.NBDKIT, system.NBDKIT_PYTHON])
    if not STAND_IN.is_file():
        raise StackError(f"the vddk stand-in plugin is missing: {STAND_IN}")
    settings = VddkSettings(plugin=str(STAND_IN))
    argv = dump_plugin_argv(settings)
    import subprocess

    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    try:
        check_dump(settings, proc.returncode, proc.stdout + proc.stderr)
    except Exception as exc:
        raise StackError(f"nbdkit does not load the vddk stand-in: {exc}") from exc
    return STAND_IN

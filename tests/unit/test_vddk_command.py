"""The nbdkit command line of a VDDK export, pinned word for word, and how nbdkit's answers are
read (pure; no process is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbtstream.config import VddkSettings
from consumers.exports import ExportNotFound
from consumers.nbd.uri import check_allowed, parse_nbd_uri
from consumers.vddk.command import (
    VddkDisk,
    check_dump,
    classify,
    dump_plugin_argv,
    error_text,
    nbdkit_argv,
    render,
)
from consumers.vddk.errors import (
    VddkLoginFailed,
    VddkPasswordError,
    VddkStartFailed,
    VddkThumbprintMismatch,
    VddkUnavailable,
)

THUMB = "B2:31:BD:DE:9F:DB:9D:E0:78:EF:30:42:8A:41:B0:28:92:93:C8:DD"
DISK = VddkDisk(server="vcenter.example.com", port=443, user="backup@vsphere.local",
                thumbprint=THUMB.lower(), vm_moref="vm-42", snapshot_moref="snapshot-7",
                file="[ds1] web01/web01_1.vmdk")
RUN = Path("/var/lib/cbtstream/copier/vddk/0123456789abcdef")


def test_golden_command_line_for_a_real_vcenter() -> None:
    argv = nbdkit_argv(VddkSettings(), DISK, password_arg="-5", socket=RUN / "nbd.sock",
                       pidfile=RUN / "nbdkit.pid")
    assert argv == [
        "nbdkit", "--exit-with-parent", "--readonly",
        "--pidfile=/var/lib/cbtstream/copier/vddk/0123456789abcdef/nbdkit.pid",
        "--unix=/var/lib/cbtstream/copier/vddk/0123456789abcdef/nbd.sock",
        "--filter=retry", "--filter=cacheextents",
        "vddk", "server=vcenter.example.com", "user=backup@vsphere.local", "password=-5",
        f"thumbprint={THUMB}", "vm=moref=vm-42", "snapshot=snapshot-7",
        "transports=nbdssl:nbd", "file=[ds1] web01/web01_1.vmdk",
    ]
    assert render(argv).endswith("transports=nbdssl:nbd 'file=[ds1] web01/web01_1.vmdk'")


def test_optional_parameters_and_the_stand_in() -> None:
    settings = VddkSettings(plugin="/opt/x/vddk_standin.py", libdir=Path("/opt/vmware-vix"),
                            config=Path("/etc/cbtstream/vddk.conf"), compression="skipz",
                            transports="nbd")
    disk = DISK.__class__(**{**DISK.__dict__, "port": 18989})
    argv = nbdkit_argv(settings, disk, password_arg="+/run/secrets/vc", socket=RUN / "s",
                       pidfile=RUN / "p")
    i = argv.index("python")
    assert argv[i:i + 4] == ["python", "/opt/x/vddk_standin.py", "server=vcenter.example.com",
                             "port=18989"]
    assert argv[-5:] == ["transports=nbd", "libdir=/opt/vmware-vix",
                         "config=/etc/cbtstream/vddk.conf", "compression=skipz",
                         "file=[ds1] web01/web01_1.vmdk"]
    assert "password=+/run/secrets/vc" in argv
    assert dump_plugin_argv(settings) == [
        "nbdkit", "--filter=retry", "--filter=cacheextents", "python",
        "/opt/x/vddk_standin.py", "libdir=/opt/vmware-vix", "--dump-plugin"]


@pytest.mark.parametrize("arg", ["s3cret", "-", "+relative/file", ""])
def test_the_password_itself_is_never_an_argument(arg: str) -> None:
    with pytest.raises(ValueError, match="password"):
        nbdkit_argv(VddkSettings(), DISK, password_arg=arg, socket=RUN / "s", pidfile=RUN / "p")


def test_dump_plugin_names_what_is_missing() -> None:
    s = VddkSettings()
    missing = ("nbdkit: error: cannot open plugin \"vddk\": /usr/lib/x86_64-linux-gnu/nbdkit/"
               "plugins/nbdkit-vddk-plugin.so: cannot open shared object file")
    with pytest.raises(VddkUnavailable, match=r"cannot load the plugin 'vddk'.*Debian 12"):
        check_dump(s, 1, missing)
    with pytest.raises(VddkUnavailable, match=r"libvixDiskLib\.so.*copier\.vddk\.libdir"):
        check_dump(s, 0, "path=/usr/lib/nbdkit-vddk-plugin.so\nname=vddk\n"
                         "vddk_default_libdir=/usr/lib64/vmware-vix-disklib\n")
    with pytest.raises(VddkUnavailable, match="not a vddk plugin"):
        check_dump(s, 0, "name=file\n")
    info = check_dump(s, 0, "vddk_default_libdir=/x\nvddk_library_version=8\n")
    assert info["vddk_library_version"] == "8"


def test_errors_are_read_from_nbdkit_stderr() -> None:
    traceback = "\n".join([
        "nbdkit: python[1]: error: /x/vddk_standin.py: open: error: Traceback (most recent "
        "call last):",
        '   File "/x/vddk_standin.py", line 247, in open',
        "    session = _Session()",
        ' RuntimeError: VixDiskLib_Open: [ds] a.vmdk: Unknown error. Please verify whether the '
        '"thumbprint" parameter (AA) matches'])
    assert "Traceback" not in error_text(traceback)
    assert isinstance(classify(traceback, "open"), VddkThumbprintMismatch)
    assert isinstance(classify("nbdkit: error: open /run/pw: No such file or directory\n"
                               "RuntimeError: open /run/pw: password", "x"), VddkPasswordError)
    assert isinstance(classify("RuntimeError: VixDiskLib_ConnectEx: Cannot connect to host h: "
                               "login failed for user u", "x"), VddkLoginFailed)
    assert isinstance(classify("nbdkit: error: unknown parameter 'foo'", "x"), VddkUnavailable)
    assert isinstance(classify("RuntimeError: VixDiskLib_Open: f: The system cannot find the "
                               "file specified", "x"), ExportNotFound)
    assert isinstance(classify("something else", "x"), VddkStartFailed)


def test_allow_list_folder_entries() -> None:
    allow = ["unix:/var/lib/cbtstream/vddk/"]
    check_allowed(parse_nbd_uri("nbd+unix:///?socket=/var/lib/cbtstream/vddk/ab/nbd.sock"),
                  allow)
    from cbtstream.errors import PermissionDenied

    for bad in ("/var/lib/cbtstream/vddk/../other/nbd.sock", "/var/lib/cbtstream/vddkx/s",
                "/var/lib/cbtstream/vddk"):
        with pytest.raises(PermissionDenied):
            check_allowed(parse_nbd_uri(f"nbd+unix:///?socket={bad}"), allow)

"""The image itself (Dockerfile): its user, its volumes and their owner, and the copier's VDDK
set-up (the real plugin and VDDK are mounted by the operator; see README, "Reading VMware
disks").

The image is built by ``deploy/image/build.sh`` on a base made from Debian packages (no image
registry is reachable where these run); see tests/deploy/podman.py.
"""

from __future__ import annotations

import json
import uuid

import pytest

from cbtstream.config import Settings
from tests.deploy import podman
from tests.deploy.conftest import PACKAGES, Images, source_hashes

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

STATE = ("faust", "copier", "replicas")


def test_image_runs_as_its_user_with_state_volumes_it_owns(images: Images) -> None:
    (info,) = json.loads(podman.podman("image", "inspect", images.image).stdout)
    config = info["Config"]
    assert config["User"] == "cbtstream:cbtstream"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "/opt/cbtstream/bin/cbtstream"]
    assert set(config["Volumes"]) == {f"/var/lib/cbtstream/{d}" for d in STATE}
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["CBTSTREAM_COPIER__EXPORTS"] == "vddk"
    assert env["CBTSTREAM_COPIER__STATE_DIR"] == "/var/lib/cbtstream/copier"
    assert env["CBTSTREAM_COPIER__TARGET_ROOT"] == "/var/lib/cbtstream/replicas"
    assert env["CBTSTREAM_STREAMS__DATA_DIR"] == "/var/lib/cbtstream/faust"
    assert env["CBTSTREAM_COPIER__VDDK__LIBDIR"] == "/opt/vmware-vix-disklib-distrib"
    assert env["CBTSTREAM_COPIER__VDDK__PLUGIN"] == "/opt/nbdkit-vddk/nbdkit-vddk-plugin.so"
    assert "unix:/var/lib/cbtstream/copier/vddk/" in json.loads(env["CBTSTREAM_COPIER__NBD_ALLOW"])
    assert not any("PASSWORD" in k or "TOKEN" in k for k in env)

    # Fresh named volumes (as compose makes them) start as copies of the image's folders: owned
    # by the service user, who writes there and cannot write the program.
    name = f"cbtimg{uuid.uuid4().hex[:8]}"
    mounts = []
    for d in STATE:
        podman.volume(f"{name}-{d}")
        mounts += ["-v", f"{name}-{d}:/var/lib/cbtstream/{d}"]
    script = ("id -u; for d in faust copier replicas; do stat -c '%u %a' /var/lib/cbtstream/$d;"
              " touch /var/lib/cbtstream/$d/probe; done;"
              " touch /opt/cbtstream/probe 2>/dev/null || echo program read-only")
    try:
        out = podman.podman("run", "--rm", *podman.RUN_OPTS, *mounts, "--entrypoint", "sh",
                            images.image, "-c", script)
    finally:
        for d in STATE:
            podman.podman("volume", "rm", "-f", f"{name}-{d}", check=False)
    assert out.stdout.split("\n") == ["10001", *["10001 750"] * 3, "program read-only", ""]

    version = podman.podman("run", "--rm", *podman.RUN_OPTS, images.image, "--version")
    assert version.stdout.startswith("cbtstream ")


_HASHES = ("import hashlib, json, pathlib, sys\n"
           "root = pathlib.Path(sys.argv[1])\n"
           "print(json.dumps({str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()"
           " for pkg in sys.argv[2:] for f in sorted((root / pkg).rglob('*.py'))}))\n")


def test_image_holds_the_working_tree(images: Images) -> None:
    """The installed package is the working tree's, module for module (as it was when the build
    started, or now: others may edit it meanwhile). A layer cache that kept an older wheel
    (buildah does not key a RUN's cache on what it bind-mounts) fails here."""
    out = podman.podman("run", "--rm", *podman.RUN_OPTS, "--entrypoint", "python3",
                        images.image, "-c", _HASHES,
                        "/opt/cbtstream/lib/python3.11/site-packages", *PACKAGES).stdout
    installed: dict[str, str] = json.loads(out)
    now = source_hashes(podman.REPO)
    assert len(installed) > 100
    assert set(installed) in (set(images.sources), set(now))
    stale = [f for f, h in installed.items() if h not in (images.sources.get(f), now.get(f))]
    assert not stale, stale


def _vsphere_env(settings: Settings) -> tuple[dict[str, str], list[str]]:
    """The environment and mounts that point a container at the stack's simulator."""
    from cbtctl.demo.run import stack_settings

    s = stack_settings(settings)
    assert s.vsphere.cafile is not None
    return ({"CBTSTREAM_VSPHERE__URL": s.vsphere.url,
             "CBTSTREAM_VSPHERE__CAFILE": "/run/cbtstream/vcenter-ca.pem",
             "CBTSTREAM_COPIER__METRICS_PORT": "0"},
            [f"{s.vsphere.cafile}:/run/cbtstream/vcenter-ca.pem:ro"])


def test_copier_refuses_to_start_without_the_vddk_plugin(images: Images,
                                                         stack_settings: Settings) -> None:
    """The image runs the copier for VDDK; until the plugin is mounted it says what is missing
    and where it belongs."""
    env, mounts = _vsphere_env(stack_settings)
    argv = ["run", "--rm", *podman.RUN_OPTS]
    for k, v in env.items():
        argv += ["-e", f"{k}={v}"]
    for m in mounts:
        argv += ["-v", m]
    proc = podman.podman(*argv, images.image, "copier", check=False, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "nbdkit cannot load the plugin '/opt/nbdkit-vddk/nbdkit-vddk-plugin.so'" in proc.stderr
    assert "build nbdkit's plugins/vddk" in proc.stderr

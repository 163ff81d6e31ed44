"""The units of deploy/systemd, run: systemd as PID 1 in a container of the image (podman,
privileged, host network) starts the worker, the audit consumer, a copier pool and a snapshot
schedule from the unit files as they are, hardening included, against the local stack; a
simulator VM is replicated full then incremental, every replica equal to its snapshot.

What differs from a host, and why: secrets. systemd 252 in this container leaves every
credentials folder empty (even for root, even ``SetCredential=``), so a test drop-in replaces
``LoadCredential=`` by files of the service user; the credential wiring itself is checked by
test_systemd.py. And the copier gets CAP_DAC_READ_SEARCH to let the vddk stand-in read the
simulator's root-only frozen images (the real plugin reads ESXi over the network).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtctl.watcher import Watcher
from cbtstream.config import Settings
from cbtstream.vsphere.simctl import SimulatorControl
from schemas.events import ChangeIdCommitted, SyncPlanned
from tests.deploy import podman
from tests.deploy.conftest import HERE, Images
from tests.support import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

SYSTEMD_IMAGE = "localhost/cbtstream-systemd:test"
UNITS = podman.REPO / "deploy" / "systemd"
ROLES = ("cbtstream-worker", "cbtstream-audit", "cbtstream-copier@pool1")
TEST_DROPIN = """[Service]
# systemd in this container leaves credentials folders empty: files of the user instead
LoadCredential=
Environment=CBTSTREAM_VSPHERE__PASSWORD_FILE=/etc/cbtstream/test-secrets/vcenter-password
Environment=CBTSTREAM_POSTGRES__PASSWORD_FILE=/etc/cbtstream/test-secrets/postgres-password
"""
STANDIN_DROPIN = """[Service]
# the vddk stand-in reads the simulator's frozen images (root's, 0600)
CapabilityBoundingSet=CAP_DAC_READ_SEARCH
AmbientCapabilities=CAP_DAC_READ_SEARCH
"""


@pytest.fixture(scope="session")
def systemd_image(images: Images) -> str:
    before = podman.image_id(SYSTEMD_IMAGE)
    seconds = podman.build(SYSTEMD_IMAGE, "--file", str(HERE / "Dockerfile.systemd"),
                           "--build-arg", f"IMAGE={images.standin}", "--host-trust",
                           log=podman.CACHE / "build-systemd.log")
    podman.replaced(SYSTEMD_IMAGE, before)
    print(f"\n{SYSTEMD_IMAGE} built in {seconds:.0f}s")
    return SYSTEMD_IMAGE


def _toml(settings: Settings, schema: str, web_port: int, *, copier: bool) -> str:
    k, p, v = settings.kafka, settings.postgres, settings.vsphere
    text = (f'[kafka]\nbootstrap_servers = "{k.bootstrap_servers}"\n'
            f'topic_prefix = "{k.topic_prefix}"\npartitions = {k.partitions}\n'
            f'[vsphere]\nurl = "{v.url}"\nusername = "{v.username}"\n'
            'cafile = "/etc/cbtstream/vcenter-ca.pem"\n')
    if copier:
        return text + (
            '[copier]\ntarget_root = "/var/lib/cbtstream/replicas"\nexports = "vddk"\n'
            'nbd_allow = ["127.0.0.1", "unix:/run/cbtstream-copier-pool1/"]\n'
            'metrics_port = 0\nprogress_interval_s = 0.5\n'
            '[copier.vddk]\nplugin = "/opt/nbdkit-vddk/vddk_standin.py"\n')
    return text + (f'[postgres]\nhost = "{p.host}"\nport = {p.port}\nuser = "{p.user}"\n'
                   f'database = "{p.database}"\ndb_schema = "{schema}"\n'
                   f'[streams]\nweb_port = {web_port}\n')


class SystemdHost:
    """A container booted with systemd, the units installed, /etc/cbtstream prepared."""

    def __init__(self, image: str, settings: Settings, schema: str, tmp: Path) -> None:
        self.name = f"cbtsd{uuid.uuid4().hex[:8]}"
        self.web_port = free_port()
        self.etc = tmp / "etc-cbtstream"
        (self.etc / "credentials").mkdir(parents=True, mode=0o700)
        secrets = self.etc / "test-secrets"
        secrets.mkdir(mode=0o500)
        for name, value in (("vcenter-password", settings.vsphere.password),
                            ("postgres-password", settings.postgres.password)):
            for folder, owner in ((self.etc / "credentials", 0), (secrets, 10001)):
                (folder / name).write_text(value.get_secret_value())
                os.chown(folder / name, owner, owner)
                (folder / name).chmod(0o400)
        os.chown(secrets, 10001, 10001)
        assert settings.vsphere.cafile is not None
        (self.etc / "vcenter-ca.pem").write_bytes(settings.vsphere.cafile.read_bytes())
        (self.etc / "cbtstream.toml").write_text(_toml(settings, schema, self.web_port,
                                                       copier=False))
        (self.etc / "copier-pool1.toml").write_text(_toml(settings, schema, self.web_port,
                                                          copier=True))
        dropins = tmp / "dropins"
        # distinct names: a drop-in of the same name in the more specific folder would hide
        # the prefix folder's
        frozen = settings.stack.dir.resolve() / "vcsim" / "frozen"
        # The stand-in reads the frozen images where the simulator keeps them, in this
        # checkout's .stack: under /tmp or /home for some checkouts, which the copier's
        # PrivateTmp=/ProtectHome= hide; bind that one folder back in (a real VDDK reads over
        # the network and needs no such path).
        standin = STANDIN_DROPIN + f"BindReadOnlyPaths={frozen}\n"
        for folder, name, text in (("cbtstream-.service.d", "zz-test-secrets.conf", TEST_DROPIN),
                                   ("cbtstream-copier@.service.d", "zz-test-standin.conf",
                                    standin)):
            (dropins / folder).mkdir(parents=True)
            (dropins / folder / name).write_text(text)
        mounts = [f"{self.etc}:/etc/cbtstream:ro", f"{frozen}:{frozen}:ro",
                  f"{podman.REPO / 'devstack/nbdkit-vddk'}:/opt/nbdkit-vddk:ro"]
        for unit in [*sorted(UNITS.glob("*.service")), UNITS / "cbtstream.target"]:
            mounts.append(f"{unit}:/etc/systemd/system/{unit.name}:ro")
        for folder in ("cbtstream-.service.d", "cbtstream-copier@.service.d"):
            mounts.append(f"{dropins / folder}:/etc/systemd/system/{folder}:ro")
        argv = ["run", "-d", "--name", self.name, *podman.HOST_OPTS, "--privileged",
                "--systemd=always"]
        for m in mounts:
            argv += ["-v", m]
        podman.podman(*argv, image, timeout=60)
        deadline = time.monotonic() + 60
        while self.exec("systemctl", "is-system-running", check=False).strip() not in (
                "running", "degraded"):
            assert time.monotonic() < deadline, "systemd did not boot in the container"
            time.sleep(0.5)

    def exec(self, *argv: str, check: bool = True) -> str:
        return podman.podman("exec", self.name, *argv, check=check, timeout=120).stdout

    def check(self) -> None:
        states = self.exec("systemctl", "is-active", *ROLES, check=False).split()
        for unit, state in zip(ROLES, states, strict=True):
            if state != "active":
                raise RuntimeError(f"{unit} is {state}:\n{self.journal(unit)[-4000:]}")

    def journal(self, unit: str) -> str:
        return self.exec("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False)

    def sha256(self, path: str) -> str:
        return self.exec("sha256sum", path).split()[0]

    def remove(self) -> None:
        podman.podman("rm", "-f", "-v", self.name, timeout=120, check=False)


@pytest.fixture
def systemd_host(systemd_image: str, kafka_settings: Settings, audit_schema: str,
                 tmp_path: Path) -> Iterator[SystemdHost]:
    host = SystemdHost(systemd_image, stack_settings(kafka_settings), audit_schema, tmp_path)
    yield host
    host.remove()


def _planned(watcher: Watcher) -> list[str]:
    """The VM snapshots planned so far, in order."""
    return list(dict.fromkeys(e.vm_snapshot for e in watcher.events
                              if isinstance(e, SyncPlanned)))


async def _nth_snapshot(watcher: Watcher, n: int) -> str:
    await watcher.wait_for(lambda: len(_planned(watcher)) >= n, 60)
    return _planned(watcher)[n - 1]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


async def test_units_replicate_under_systemd(systemd_host: SystemdHost, kafka_settings: Settings,
                                             tmp_path: Path) -> None:
    h = systemd_host
    t0 = time.monotonic()
    h.exec("systemctl", "start", *ROLES)
    deadline = time.monotonic() + 120
    while not await asyncio.to_thread(_ready, h.web_port):
        await asyncio.to_thread(h.check)
        assert time.monotonic() < deadline, h.journal("cbtstream-worker")[-4000:]
        await asyncio.sleep(0.5)
    settings = stack_settings(kafka_settings)
    sim = SimulatorControl.from_state(settings.stack.dir.resolve() / "vcsim")
    scenario = Scenario(settings, sim, tmp_path / "models", seed=2, timeout_s=180)
    scenario.check_alive.append(h.check)
    try:
        vm = await scenario.create_vm(random_name("systemd"), [16 * MiB, 8 * MiB])
        keys = [d.key for d in vm.disks]
        (h.etc / "snapshot-gold.env").write_text(
            f"SNAPSHOT_EVERY=1h\nSNAPSHOT_VMS={vm.instance_uuid}\nSNAPSHOT_OPTIONS=\n")
        assert scenario.watcher is not None
        watcher = scenario.watcher
        for cycle in (1, 2):
            await scenario.write([w for d in vm.disks for w in (
                initial_fill(scenario.rng, d.key, d.capacity) if cycle == 1
                else scattered(scenario.rng, d.key, d.capacity))])
            # the schedule snapshots when it starts, then every hour
            h.exec("systemctl", "restart", "cbtstream-snapshot@gold")
            snap = await _nth_snapshot(watcher, cycle)
            await scenario.wait(snap, keys)
            for key in keys:
                out = watcher.outcomes(snap)[key]
                assert isinstance(out, ChangeIdCommitted), out
                assert out.replication_type == ("full" if cycle == 1 else "incremental")
                replica = f"/var/lib/cbtstream/replicas/{vm.instance_uuid}/disk-{key}.img"
                model = hashlib.sha256(scenario.model(key).read_bytes()).hexdigest()
                assert await asyncio.to_thread(h.sha256, replica) == model, (cycle, key)
                print(f"systemd cycle {cycle} disk-{key}: {out.replication_type}, replica == "
                      "snapshot")
    finally:
        await scenario.close()
    units = [*ROLES, "cbtstream-snapshot@gold"]
    h.exec("systemctl", "stop", *units)
    for unit in units:
        result = h.exec("systemctl", "show", "-p", "Result", "--value", unit).strip()
        assert result == "success", (unit, h.journal(unit)[-3000:])
        errors = [line for line in h.journal(unit).splitlines() if '"level":"error"' in line]
        assert not errors, (unit, errors[:5])
    print(f"units started, replicated twice and stopped cleanly in {time.monotonic() - t0:.1f}s")

"""Restore points through the real pipeline (Kafka, Faust, the simulator, nbdkit): every commit is
a point, older points keep the bytes later syncs overwrote, ``cbtstream points export``
materialises a point and proves it against its commit's root. Every comparison is byte for byte
against the disk models the scenario keeps of each cycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbtctl.demo.processes import child_env
from cbtctl.demo.scenario import CycleResult, Scenario, random_name
from cbtctl.demo.workload import MiB, Write, initial_fill, scattered
from cbtstream.config import PointsPolicy, Settings, TargetMapping
from consumers.points import catalogue as cat_mod
from consumers.points.undo import file_names, store_of
from tests.e2e.conftest import Pipeline
from tests.e2e.test_targets import loop_device, qemu_nbd  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

SIZES = [8 * MiB, 4 * MiB + 64 * 1024]


def _with_points(settings: Settings, policy: PointsPolicy, **copier: object) -> Settings:
    c = settings.copier.model_copy(update=copier)
    return settings.model_copy(update={"points": policy, "copier": c})


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cbtctl.cli", "points", *args],
                          env=child_env(settings), capture_output=True, text=True, timeout=300)


def points_of(settings: Settings, vm: str) -> list[dict[str, object]]:
    done = cli(settings, "list", "--vm", vm, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def export_vm(settings: Settings, vm: str, at: str, to: Path, fmt: str = "raw"
              ) -> subprocess.CompletedProcess[str]:
    return cli(settings, "export", "--vm", vm, "--at", at, "--to", str(to), "--format", fmt,
               "--json")


def models(scenario: Scenario, keys: list[int]) -> dict[int, bytes]:
    return {k: scenario.model(k).read_bytes() for k in keys}


def exported(to: Path, vm: str, key: int, fmt: str = "raw") -> Path:
    return to / f"{vm}-disk-{key}.{fmt}"


def _ok(cycle: CycleResult) -> None:
    assert all(r.verified for r in cycle.rows), cycle.rows


async def test_retention_ten_cycles_count_four(
    scenario: Scenario, pipeline: Pipeline, e2e_settings: Settings, tmp_path: Path,
) -> None:
    settings = _with_points(e2e_settings, PointsPolicy(count=4))
    pipeline.settings = settings
    pipeline.start_copier()
    vm = await scenario.create_vm(random_name("e2e-points"), SIZES)
    keys = [d.key for d in vm.disks]
    rng = scenario.rng
    snaps: list[str] = []
    at_cycle: dict[str, dict[int, bytes]] = {}
    for n in range(1, 11):
        writes = [w for d in vm.disks for w in (
            initial_fill(rng, d.key, d.capacity) if n == 1 else scattered(rng, d.key,
                                                                         d.capacity))]
        if n % 3 == 0:  # now and then a larger overwrite: 1 MiB of the first disk
            writes.append(Write(keys[0], rng.randrange(0, 6) * MiB, rng.randbytes(MiB)))
        c = await scenario.cycle(n, writes)
        _ok(c)
        snaps.append(c.vm_snapshot)
        at_cycle[c.vm_snapshot] = models(scenario, keys)

    rows = points_of(settings, vm.instance_uuid)
    for key in keys:
        mine = [r for r in rows if r["disk_key"] == f"{vm.instance_uuid}/disk-{key}"]
        # exactly 4 points remain, the newest 4 cycles', all complete; the newest is live
        assert [r["vm_snapshot"] for r in mine] == snaps[-4:], mine
        assert all(r["complete"] for r in mine)
        assert [r["live"] for r in mine] == [False, False, False, True]
        assert all(int(str(r["undo_bytes"])) > 0 for r in mine[:-1])
        # the dropped points' undo data is gone: the only undo files are those of the stores
        # the catalogue names (the three older points' sealed stores)
        replica = scenario.replica(key)
        cat = cat_mod.load(replica.parent, replica.name)
        assert cat is not None
        named = {p.store for p in cat.points if p.store}
        on_disk = {s for e in os.listdir(replica.parent) if (s := store_of(replica.name, e))}
        assert on_disk == named and len(named) == 3, (on_disk, named)
        files = [e for e in os.listdir(replica.parent) if store_of(replica.name, e)]
        assert len(files) == 9  # data, index, seal of each

    # every remaining point exported equals the models of its cycle, byte for byte
    for snap in snaps[-4:]:
        to = tmp_path / "export" / snap
        done = export_vm(settings, vm.instance_uuid, snap, to)
        assert done.returncode == 0, done.stdout + done.stderr
        for key in keys:
            assert exported(to, vm.instance_uuid, key).read_bytes() == at_cycle[snap][key], \
                (snap, key)
    # a dropped point cannot be exported
    done = export_vm(settings, vm.instance_uuid, snaps[0], tmp_path / "gone")
    assert done.returncode == 1 and "no complete point" in done.stdout, done.stdout
    # qcow2 (through qemu-img) of the oldest point kept
    to = tmp_path / "qcow2"
    done = export_vm(settings, vm.instance_uuid, snaps[-4], to, "qcow2")
    assert done.returncode == 0, done.stdout + done.stderr
    for key in keys:
        raw = tmp_path / f"cmp-{key}.raw"
        raw.write_bytes(at_cycle[snaps[-4]][key])
        cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw),
                              str(exported(to, vm.instance_uuid, key, "qcow2"))])
        assert cmp.returncode == 0


async def test_ransomware_previous_point_is_the_pre_attack_disk(
    scenario: Scenario, pipeline: Pipeline, e2e_settings: Settings, tmp_path: Path,
) -> None:
    settings = _with_points(e2e_settings, PointsPolicy(count=5))
    pipeline.settings = settings
    pipeline.start_copier()
    big = 16 * MiB
    vm = await scenario.create_vm(random_name("e2e-ransom"), [big, 4 * MiB])
    keys = [d.key for d in vm.disks]
    victim = keys[0]
    rng = scenario.rng
    cycles = [await scenario.cycle(1, [w for d in vm.disks for w in initial_fill(
        rng, d.key, d.capacity)])]
    for n in (2, 3):
        cycles.append(await scenario.cycle(n, [w for d in vm.disks for w in scattered(
            rng, d.key, d.capacity)]))
    for c in cycles:
        _ok(c)
    before = models(scenario, keys)
    # the guest encrypts 80% of the disk: random bytes over 80% of its MiBs, in 1 MiB writes
    mibs = sorted(rng.sample(range(big // MiB), int(big // MiB * 0.8)))
    attack = await scenario.cycle(4, [Write(victim, i * MiB, rng.randbytes(MiB)) for i in mibs])
    _ok(attack)  # the live replica equals the attacked disk (the sync replicated it)
    after = models(scenario, keys)
    assert after[victim] != before[victim]
    assert scenario.replica(victim).read_bytes() == after[victim]

    to = tmp_path / "restore"
    done = export_vm(settings, vm.instance_uuid, cycles[-1].vm_snapshot, to)
    assert done.returncode == 0, done.stdout + done.stderr
    for key in keys:
        assert exported(to, vm.instance_uuid, key).read_bytes() == before[key], key
    rows = [r for r in points_of(settings, vm.instance_uuid)
            if r["disk_key"] == f"{vm.instance_uuid}/disk-{victim}"]
    pre = next(r for r in rows if r["vm_snapshot"] == cycles[-1].vm_snapshot)
    assert int(str(pre["undo_bytes"])) >= len(mibs) * MiB  # the attack's old bytes were saved
    # the live point exports as the attacked disk
    live = tmp_path / "live"
    done = export_vm(settings, vm.instance_uuid, attack.vm_snapshot, live)
    assert done.returncode == 0, done.stdout + done.stderr
    assert exported(live, vm.instance_uuid, victim).read_bytes() == after[victim]

    # a point that does not prove is refused: one byte of the replica changed behind the
    # copier's back (the live point reads every byte from the replica)
    other = keys[1]
    path = scenario.replica(other)
    with open(path, "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0xFF]))
    bad = tmp_path / "bad"
    done = cli(settings, "export", "--disk", f"{vm.instance_uuid}/disk-{other}", "--at",
               attack.vm_snapshot, "--to", str(bad))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "does not match its hash tree root" in done.stdout
    assert not exported(bad, vm.instance_uuid, other).exists()
    # and a damaged undo store is refused too: one byte of the pre-attack point's saved data
    store_dir, name = scenario.replica(victim).parent, scenario.replica(victim).name
    cat = cat_mod.load(store_dir, name)
    assert cat is not None
    point = cat.select(cycles[-1].vm_snapshot)
    assert point is not None and point.store is not None
    data = store_dir / file_names(name, point.store)[0]
    with open(data, "r+b") as fh:
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 0xFF]))
    done = cli(settings, "export", "--disk", f"{vm.instance_uuid}/disk-{victim}", "--at",
               cycles[-1].vm_snapshot, "--to", str(bad))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "do not match their checksum" in done.stdout
    assert not exported(bad, vm.instance_uuid, victim).exists()


async def test_points_on_block_device_and_nbd_targets(
    scenario: Scenario, pipeline: Pipeline, e2e_settings: Settings, tmp_path: Path,
    loop_device: str, qemu_nbd: tuple[str, Path],  # noqa: F811 - fixtures
) -> None:
    vm = await scenario.create_vm(random_name("e2e-points-tgt"), SIZES)
    a, b = (d.key for d in vm.disks)
    uri, _ = qemu_nbd
    settings = _with_points(e2e_settings, PointsPolicy(count=3), targets=(
        TargetMapping(disk=f"{vm.instance_uuid}/disk-{a}", device=loop_device),
        TargetMapping(disk=f"{vm.instance_uuid}/disk-{b}", nbd=uri)),
        device_allow=("/dev/loop*",))
    pipeline.settings = settings
    pipeline.start_copier()
    rng = scenario.rng
    snaps: list[str] = []
    at_cycle: dict[str, dict[int, bytes]] = {}
    for n in range(1, 5):
        c = await scenario.cycle(n, [w for d in vm.disks for w in (
            initial_fill(rng, d.key, d.capacity) if n == 1
            else scattered(rng, d.key, d.capacity))])
        assert all(r.new_change_id for r in c.rows), c.rows
        snaps.append(c.vm_snapshot)
        at_cycle[c.vm_snapshot] = models(scenario, [a, b])
    with open(loop_device, "rb") as fh:
        assert fh.read(SIZES[0]) == at_cycle[snaps[-1]][a]
    rows = points_of(settings, vm.instance_uuid)
    assert sorted({str(r["vm_snapshot"]) for r in rows}) == sorted(snaps[-3:])
    assert len(rows) == 6
    # the catalogue and undo files of both live beside their records in the state area
    assert len(list((settings.copier.state_dir / "targets").glob("*.points"))) == 2
    for snap in snaps[-3:]:
        to = tmp_path / "export" / snap
        done = export_vm(settings, vm.instance_uuid, snap, to)
        assert done.returncode == 0, done.stdout + done.stderr
        for key in (a, b):
            assert exported(to, vm.instance_uuid, key).read_bytes() == at_cycle[snap][key], \
                (snap, key)


async def test_copier_killed_while_saving_resumes_and_keeps_the_point(
    scenario: Scenario, pipeline: Pipeline, e2e_settings: Settings, tmp_path: Path,
) -> None:
    # a bandwidth limit makes the incremental last a few seconds, so the kill lands mid-sync
    settings = _with_points(e2e_settings, PointsPolicy(count=3), max_bytes_per_s=16 * MiB)
    pipeline.settings = settings
    copier = pipeline.start_copier()
    size = 64 * MiB
    vm = await scenario.create_vm(random_name("e2e-points-kill"), [size])
    (key,) = [d.key for d in vm.disks]
    rng = scenario.rng
    first = await scenario.cycle(1, initial_fill(rng, key, size))
    _ok(first)
    before = scenario.model(key).read_bytes()
    # 48 MiB overwritten, then snapshot: the copier saves and writes until it is killed
    await scenario.write([Write(key, i * MiB, rng.randbytes(MiB))
                          for i in sorted(rng.sample(range(size // MiB), 48))])
    snap = (await scenario.snapshot())[0].vm_snapshot
    replica = scenario.replica(key)
    watcher = scenario.watcher
    assert watcher is not None

    def undo_saved() -> int:
        return sum((replica.parent / e).stat().st_size for e in os.listdir(replica.parent)
                   if store_of(replica.name, e) and e.endswith(".data"))

    def checkpointed() -> bool:
        return any(replica.parent.glob(f"{replica.name}.checkpoint.*"))

    await watcher.wait_for(lambda: (checkpointed() and undo_saved() > 8 * MiB)
                           or bool(watcher.outcomes(snap)), 60, alive=pipeline.check)
    assert not watcher.outcomes(snap), "sync finished before it could be interrupted"
    copier.kill()  # SIGKILL while saving and writing
    cat = cat_mod.load(replica.parent, replica.name)
    assert cat is not None and cat.pending is not None and cat.live is not None
    # the previous point reads whole while the replica is half-written (a VM point too)
    to = tmp_path / "during"
    done = export_vm(settings, vm.instance_uuid, first.vm_snapshot, to)
    assert done.returncode == 0, done.stdout + done.stderr
    assert exported(to, vm.instance_uuid, key).read_bytes() == before

    pipeline.start_copier()
    await scenario.wait(snap, [key])
    assert replica.read_bytes() == scenario.model(key).read_bytes()
    rows = points_of(settings, vm.instance_uuid)
    assert [r["vm_snapshot"] for r in rows] == [first.vm_snapshot, snap]
    assert all(r["complete"] for r in rows)
    # the resume saved into the same store, nothing twice: at most the 48 MiB overwritten
    assert int(str(rows[0]["undo_bytes"])) <= 48 * MiB
    for at, want in ((first.vm_snapshot, before), (snap, scenario.model(key).read_bytes())):
        to = tmp_path / "after" / at
        done = export_vm(settings, vm.instance_uuid, at, to)
        assert done.returncode == 0, done.stdout + done.stderr
        assert exported(to, vm.instance_uuid, key).read_bytes() == want, at

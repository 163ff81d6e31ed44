"""End-to-end fixtures: the dev stack's Kafka and vSphere simulator, an isolated topic prefix,
and the pipeline processes (Faust worker, copier) as real child processes."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from cbtctl.demo.processes import Proc
from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill
from cbtstream.config import Settings
from cbtstream.vsphere.simctl import SimulatorControl


@pytest.fixture
def e2e_settings(kafka_settings: Settings, tmp_path: Path) -> Settings:
    s = stack_settings(kafka_settings)
    copier = s.copier.model_copy(update={"state_dir": tmp_path / "copier",
                                         "checkpoint_bytes": 8 * 1024 * 1024})
    return s.model_copy(update={"copier": copier})


@pytest.fixture
def sim(e2e_settings: Settings) -> SimulatorControl:
    return SimulatorControl.from_state(e2e_settings.stack.dir.resolve() / "vcsim")


class Pipeline:
    """The worker and the copier of one test; the copier can be killed and restarted."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.worker = Proc(["worker"], settings, logs / "worker.log")
        self.copier: Proc | None = None
        self.copier_runs = 0

    def start_copier(self) -> Proc:
        self.copier_runs += 1
        self.copier = Proc(["copier"], self.settings, self.logs / f"copier-{self.copier_runs}.log")
        return self.copier

    def restart_worker(self, *, wait_ready: bool = True) -> None:
        """Stop the Faust worker and start a new one: its table recovers from the changelog.
        Waits until it reports ready (tables recovered), like a rolling restart would."""
        self.worker.stop()
        n = len(list(self.logs.glob("worker*.log")))
        self.worker = Proc(["worker"], self.settings, self.logs / f"worker-{n + 1}.log")
        if wait_ready:
            self.wait_worker_ready()

    def wait_worker_ready(self, timeout_s: float = 90.0) -> None:
        url = (f"http://{self.settings.streams.web_host}:{self.settings.streams.web_port}"
               "/api/v1/ready")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check()
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready after {timeout_s}s")

    def check(self) -> None:
        for p in (self.worker, self.copier):
            if p is not None and not p.alive:
                raise RuntimeError(f"{p.log.name} exited:\n{p.output()[-4000:]}")

    def stop(self) -> None:
        for p in (self.copier, self.worker):
            if p is not None:
                p.stop()

    def dump(self) -> str:
        return dump_logs(self.logs)


def dump_logs(logs: Path) -> str:
    """The tail of every process log in ``logs`` (printed when a test fails)."""
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-6000:]}"
                     for f in sorted(logs.glob("*.log")))


async def vm_scenario(settings: Settings, sim: SimulatorControl, workdir: Path,
                      alive: Callable[[], None], name: str, sizes: list[int],
                      seed: int) -> Scenario:
    """A scenario with a new VM of ``sizes`` disks, aborted when ``alive()`` raises (a
    pipeline process died)."""
    sc = Scenario(settings, sim, workdir, seed=seed, timeout_s=120)
    sc.check_alive.append(alive)
    await sc.create_vm(random_name(name), sizes)
    return sc


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def pipeline(e2e_settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
             ) -> Iterator[Pipeline]:
    p = Pipeline(e2e_settings, tmp_path / "logs")
    yield p
    p.stop()
    if request.node.stash.get(_FAILED, False):
        print(p.dump())


@pytest.fixture
async def scenario(e2e_settings: Settings, sim: SimulatorControl, tmp_path: Path,
                   pipeline: Pipeline) -> AsyncIterator[Scenario]:
    sc = Scenario(e2e_settings, sim, tmp_path / "models", seed=1234, timeout_s=120)
    sc.check_alive.append(pipeline.check)
    try:
        yield sc
    finally:
        await sc.close()


async def vm_with_data(scenario: Scenario, pipeline: Pipeline, prefix: str) -> list[int]:
    """A VM of two disks half filled, and the copier started; its disks' device keys."""
    await scenario.create_vm(random_name(prefix), [4 * MiB, 2 * MiB])
    assert scenario.vm is not None and scenario.vmref is not None and scenario.watcher
    await scenario.write([w for d in scenario.vm.disks
                          for w in initial_fill(scenario.rng, d.key, d.capacity, 0.5)])
    pipeline.start_copier()
    return [d.key for d in scenario.vm.disks]

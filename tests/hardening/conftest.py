"""Fixtures of the hardening tests: isolated lanes (pipeline + VM) on the dev stack's Kafka and
simulator (``soak`` tests run with ``make soak``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cbtctl.demo.run import stack_settings as sim_settings
from cbtstream.config import Settings
from cbtstream.vsphere.simctl import SimulatorControl
from tests.hardening.harness import Lane, lane_settings


@pytest.fixture
def sim(kafka_settings: Settings) -> SimulatorControl:
    return SimulatorControl.from_state(sim_settings(kafka_settings).stack.dir.resolve() / "vcsim")


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


LaneFactory = Callable[..., Awaitable[Lane]]


@pytest.fixture
async def make_lane(kafka_settings: Settings, sim: SimulatorControl, tmp_path: Path,
                    request: pytest.FixtureRequest) -> AsyncIterator[LaneFactory]:
    """``await make_lane(name, seed)``: a started lane; all are stopped at teardown (their logs
    printed if the test failed)."""
    lanes: list[Lane] = []

    async def make(name: str, seed: int, *, base: Settings | None = None, **kw: object) -> Lane:
        work = tmp_path / name
        settings = await lane_settings(base or kafka_settings, work, **kw)  # type: ignore[arg-type]
        lane = Lane(name, settings, sim, work, seed)
        lanes.append(lane)
        return lane

    yield make
    for lane in lanes:
        await lane.stop()
    if request.node.stash.get(FAILED, False):
        for lane in lanes:
            print(f"===== lane {lane.name}\n{lane.pipeline.dump()}")

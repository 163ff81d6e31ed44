"""A private simulator for the vSphere tests: built once, started once per session on a free
port in a temp dir (independent of the dev stack), with small QueryChangedDiskAreas pages so
paging is exercised on small disks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cbtctl.stack.vcsim import VcsimService
from cbtstream.config import Settings, StackSettings, VSphereSettings
from cbtstream.kafka import create_topics
from cbtstream.vsphere.adapter import VSphereClient
from cbtstream.vsphere.simctl import SimulatorControl
from tests.support import free_port, isolated_settings, kafka_answers

#: Small pages (1 MiB, at most 3 areas) so every test pages through several answers.
PAGE_BYTES = 1 << 20
MAX_AREAS = 3


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VcsimService]:
    state = tmp_path_factory.mktemp("vcsim-stack")
    settings = Settings(stack=StackSettings(dir=state))
    svc = VcsimService(settings, port=free_port(), page_bytes=PAGE_BYTES, max_areas=MAX_AREAS)
    # A binary of our own (never overwrite the dev stack's running one); go's build cache makes
    # this a link step of a few seconds after the first build.
    t0 = time.monotonic()
    svc.install()
    t1 = time.monotonic()
    svc.start()
    try:
        svc.wait_ready(60)
        t2 = time.monotonic()
        print(f"\nvcsim: install {t1 - t0:.2f}s, start to ready {t2 - t1:.2f}s")
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def sim(vcsim: VcsimService) -> SimulatorControl:
    return SimulatorControl(vcsim.side_channel_url, cafile=vcsim.cert_file)


@pytest.fixture(scope="session")
def vsphere_settings(vcsim: VcsimService) -> VSphereSettings:
    """Verification ON, against the simulator's own certificate."""
    return VSphereSettings(url=vcsim.sdk_url, cafile=vcsim.cert_file)


@pytest.fixture
async def client(vsphere_settings: VSphereSettings) -> AsyncIterator[VSphereClient]:
    async with VSphereClient(vsphere_settings) as c:
        yield c


@pytest.fixture
def vm_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def producer_settings(stack_settings: Settings, vcsim: VcsimService, tmp_path: Path
                            ) -> Settings:
    """Settings on the real broker with a unique topic prefix (topics created), and vsphere
    pointing at the private simulator. Skips only when no broker answers."""
    base = stack_settings
    if not await kafka_answers(base):
        pytest.skip(f"no Kafka broker answers at {base.kafka.bootstrap_servers}")
    settings = isolated_settings(base, tmp_path, vsphere={
        "url": vcsim.sdk_url, "cafile": vcsim.cert_file, "insecure": False,
    })
    await create_topics(settings.kafka)
    return settings

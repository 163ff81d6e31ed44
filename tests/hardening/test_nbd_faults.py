"""NBD source faults during real syncs: the copier (run in this process, so it can be given a
test-only ExportResolver) reads the snapshot images through an nbdkit of ours with the ``error``
and ``delay`` filters. The Faust worker, Kafka and the simulator are the real ones.

* read errors (EIO) -> ``SyncFailed(nbd_server_error)``, no commit; the next cycle is
  incremental from the last commit and the replica equals its snapshot;
* the server dies mid-copy and comes back -> the copier retries, resumes from its checkpoint
  and commits; the replica equals the snapshot;
* every read slowed down -> a slower copy, still the exact commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from cbtctl.demo.scenario import files_equal, random_name
from cbtstream.kafka import Publisher
from cbtstream.vsphere.adapter import VSphereClient
from consumers.copier import Copier
from consumers.vsphere_executor import VSphereExecutor
from schemas.events import ChangeIdCommitted, SyncFailed, SyncProgress
from tests.hardening.conftest import LaneFactory
from tests.hardening.harness import SIZES, Lane
from tests.hardening.nbdfaults import FaultyExports, FaultyNbd

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def in_process_copier(lane: Lane, nbd: FaultyNbd) -> AsyncIterator[Copier]:
    settings = lane.settings
    frozen = settings.stack.dir.resolve() / "vcsim" / "frozen"
    client = VSphereClient(settings.vsphere)
    await client.start()
    executor = VSphereExecutor(settings, client, FaultyExports(lane.scenario.sim, frozen, nbd))
    async with Publisher(settings.kafka) as publisher:
        copier = Copier(settings, executor, publisher)
        task = asyncio.create_task(copier.run())
        try:
            yield copier
        finally:
            copier.request_stop()
            await asyncio.wait_for(task, 30)
            await client.stop()


class _Retries(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "retrying sync":
            self.errors.append(str(getattr(record, "error", "")))


async def test_nbd_source_errors_loss_and_slowness(make_lane: LaneFactory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lane = await make_lane("nbd", 11)
    nbd = FaultyNbd(tmp_path / "nbd")
    nbd.start()
    retries = _Retries()
    logging.getLogger("cbtstream.copier").addHandler(retries)
    sc = lane.scenario
    try:
        await lane.start(random_name("fault-nbd"), SIZES, copier=False)
        async with in_process_copier(lane, nbd):
            c1 = await lane.cycle(1)  # slow reads (delay filter) throughout
            assert len(c1.commits) == 3

            # 1. read errors: every disk fails with the server's reason, nothing committed
            nbd.fail(True)
            c2 = await lane.cycle(2)
            nbd.fail(False)
            assert sc.watcher is not None
            out2 = sc.watcher.outcomes(c2.vm_snapshot)
            assert all(isinstance(o, SyncFailed) and o.reason == "nbd_server_error"
                       for o in out2.values()), out2
            assert c2.commits == {} and retries.errors == []  # EIO is final, not retried

            # 2. the server dies mid-copy, back after 0.5 s: retried, resumed, committed
            watcher = sc.watcher
            lane.cycles.remove(c2)
            mark = len(watcher.events)
            cycle3 = asyncio.create_task(lane.cycle(3))
            await watcher.wait_for(lambda: any(isinstance(e, SyncProgress) and e.bytes_done > 0
                                               for e in watcher.events[mark:]), 30)
            nbd.kill()
            await asyncio.sleep(0.5)
            nbd.start()
            c3 = await cycle3
            assert retries.errors, "the connection loss was not retried"
            assert all("nbd" in e.lower() or "connection" in e.lower() for e in retries.errors)
            assert len(c3.commits) == 3
        # cycle 3 continues from cycle 1's commits: the failed cycle 2 left no trace in lineage
        assert lane.lineage_problems() == []
        assert lane.auditor.problems == []
        assert all(isinstance(c, ChangeIdCommitted) for c in c3.commits.values())
        assert all(files_equal(sc.replica(k), sc.model(k)) for k in lane.keys)
        print(f"nbd faults: retries {len(retries.errors)}; cycle 3 {c3.seconds:.1f}s")
    finally:
        logging.getLogger("cbtstream.copier").removeHandler(retries)
        nbd.stop()

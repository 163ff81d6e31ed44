"""A site in miniature, end to end (issue 21): ``cbtstream bench site`` on the real broker with a
private simulator, two planner workers, three copiers in one shared-storage pool and the
scheduler; seeding, then incremental cycles with guest writes, one worker restarted and one
copier killed and started again. At the end no VM keeps a snapshot, nothing was recopied after
seeding, no sync failed, and every replica equals its model byte for byte.

The short variant (100 VMs) runs in ``make test``; the full one (1,000 VMs, 3,000 disks) and a
small site under churn (a copier killed in every cycle) in ``make soak``. All print the bench's
figures (speed is reported, not asserted), and check that the status from the table counts every
disk under the scheduler's policy and its RPO.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cbtctl.bench.site import SiteOptions, SiteResult, run_site
from cbtstream.config import Settings


def _check(result: SiteResult, opts: SiteOptions) -> None:
    assert result.disks == opts.vms * opts.disks_per_vm
    assert result.replicas_differing == 0
    assert result.snapshots_left == 0
    assert result.recopies_after_seeding == 0
    assert result.failures == {}
    assert [c.commits for c in result.cycles] == [result.disks] * opts.cycles
    assert result.schedule.get("snapshot_failed", 0) == 0
    # the status from the table (2 workers' parts) counts every disk once, each measured
    # against the RPO of the policy that snapshotted it (carried by its snapshots)
    status = result.status
    assert status is not None and status["disks"] == result.disks
    assert list(status["policies"]) == ["site"]
    site = status["policies"]["site"]
    assert (site["disks"], site["rpo_s"], site["rpo"]["none"]) == (result.disks, opts.rpo_s, 0)
    assert sum(status["rpo"].values()) == result.disks


@pytest.mark.integration
@pytest.mark.timeout(900)
async def test_a_site_of_100_vms(stack_settings: Settings, tmp_path: Path) -> None:
    # INFO logs: a time-out prints what each process said of the disks it waits for
    opts = SiteOptions(vms=100, disks_per_vm=2, cycles=3, every_s=15.0, rpo_s=120.0,
                       timeout_s=600.0, log_level="INFO")
    _check(await run_site(stack_settings, opts, tmp_path), opts)


@pytest.mark.integration
@pytest.mark.soak
@pytest.mark.timeout(1800)
async def test_a_site_under_churn(stack_settings: Settings, tmp_path: Path) -> None:
    """A copier killed in every cycle, a worker restarted in every other: the run that found a
    copy cancelled by the rebalance leaving its replica locked (every later sync of the disk
    refused ``replica_in_use``)."""
    opts = SiteOptions(vms=40, disks_per_vm=2, cycles=8, every_s=10.0, rpo_s=120.0,
                       timeout_s=300.0, log_level="INFO", churn=True)
    _check(await run_site(stack_settings, opts, tmp_path), opts)


@pytest.mark.integration
@pytest.mark.soak
@pytest.mark.timeout(3 * 3600)
async def test_a_site_of_1000_vms(stack_settings: Settings, tmp_path: Path) -> None:
    opts = SiteOptions(vms=1000, disks_per_vm=3, cycles=5, every_s=60.0, rpo_s=300.0,
                       timeout_s=3600.0)
    _check(await run_site(stack_settings, opts, tmp_path), opts)

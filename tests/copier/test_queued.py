"""The copier's queued reports (``consumers/queued.py``, pure): how often, and what they say."""

from __future__ import annotations

from cbtstream.config import CopierSettings, Settings, StreamsSettings
from consumers.queued import (
    DATASTORE,
    ESXI_HOST,
    queued_reports,
    report_interval,
    source_limits,
    sources,
    wait_reason,
)
from consumers.schedule import WaitsFor
from tests.copier.fakes import plan
from tests.unit.factories import disk


def _settings(interval: float, timeout: float) -> Settings:
    return Settings(copier=CopierSettings(queue_report_interval_s=interval),
                    streams=StreamsSettings(sync_timeout_s=timeout))


def test_the_interval_stays_well_under_the_silent_sync_timeout() -> None:
    assert report_interval(_settings(60, 1800)) == 60
    assert report_interval(_settings(60, 10)) == 2  # a fifth of the time-out at most
    assert report_interval(_settings(60, 0)) == 60  # time-out off


def test_reports_number_the_waiting_plans_once_each_and_skip_running_syncs() -> None:
    a, b, c = plan(1), plan(2), plan(3)
    slot, key = WaitsFor("slot", limit=4), WaitsFor("key")
    reports = queued_reports([(b, slot), (a, key), (b, key), (c, key)], active=[a])
    assert [(r.sync_id, r.state, r.queue_position, r.wait_reason) for r in reports] == [
        (b.sync_id, "queued", 1, "a copy slot (copier at its limit of 4)"),
        (c.sync_id, "queued", 2, "the disk's previous plan")]
    assert all(r.bytes_done == 0 and r.disk == p.disk for r, p in zip(reports, (b, c),
                                                                        strict=True))


def test_wait_reasons_name_the_limit_that_holds_a_plan() -> None:
    assert wait_reason(WaitsFor(ESXI_HOST, "esx-07.lab", 2)) == \
        "esxi host esx-07.lab at its limit of 2"
    assert wait_reason(WaitsFor(DATASTORE, "ds1", 8)) == "datastore ds1 at its limit of 8"
    assert wait_reason(WaitsFor("key")) == "the disk's previous plan"
    assert len(wait_reason(WaitsFor(DATASTORE, "d" * 2000, 8))) == 1024


def test_a_copy_holds_its_esxi_host_and_its_datastore() -> None:
    p = plan(1).model_copy(update={"esxi_host": "ESX-07.lab"})
    assert sources(p) == ((ESXI_HOST, "esx-07.lab"), (DATASTORE, "ds1"))
    # a plan made before esxi_host existed is limited by its datastore only
    assert sources(plan(1)) == ((DATASTORE, "ds1"),)
    odd = plan(1).model_copy(update={"disk": disk(1, backing_file="/vmfs/volumes/x.vmdk")})
    assert sources(odd) == ()
    assert source_limits(CopierSettings(max_copies_per_esxi_host=2)) == {
        ESXI_HOST: 2, DATASTORE: 8}

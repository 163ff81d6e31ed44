"""The topic check's rules (cbtstream.topic_check), without a broker: which differences from the
catalogue are errors, which are warnings, and what the messages say."""

from __future__ import annotations

import logging

import pytest

from cbtstream.config import KafkaSettings
from cbtstream.topic_check import (
    PARTITIONS,
    TopicsMismatch,
    catalogue_layout,
    co_partitioned,
    compare_topic,
    layout_report,
)

K = KafkaSettings(topic_prefix="p.", partitions=4, bootstrap_servers="k1:9092,k2:9092")
CONNECT = "--bootstrap-server k1:9092"
DAY = str(86_400_000)


def problems(expected: dict[str, str], actual: dict[str, str], parts: tuple[int, int] = (4, 4),
             co: bool = True) -> list[tuple[str, str, str, bool]]:
    found = compare_topic("p.t", (parts[0], expected), (parts[1], actual), co_partitioned=co,
                          connect=CONNECT)
    return [(p.setting, p.expected, p.actual, p.error) for p in found]


def test_the_catalogue_matches_itself() -> None:
    layout = catalogue_layout(K)
    report = layout_report(K, layout, layout)
    assert report.problems == () and report.missing == () and report.hint == ""
    report.enforce()


def test_which_topics_are_co_partitioned() -> None:
    assert co_partitioned("p.cbt.snapshot.taken", K)
    assert co_partitioned("p.cbt.sync.progress", K)
    assert co_partitioned("p.cbtstream-disks-changelog", K)
    assert co_partitioned("p.cbtstream-snapshot-lifecycle", K)
    assert not co_partitioned("p.cbt.deadletter", K)
    assert not co_partitioned("p.cbt.changeid.fences", K)
    assert not co_partitioned("p.cbtstream-__assignor-__leader", K)


def test_partition_count_is_an_error_for_co_partitioned_topics_only() -> None:
    assert problems({}, {}, parts=(4, 6)) == [(PARTITIONS, "4", "6", True)]
    assert problems({}, {}, parts=(4, 2)) == [(PARTITIONS, "4", "2", True)]
    assert problems({}, {}, parts=(4, 6), co=False) == []


def test_cleanup_policy_is_an_error_both_ways() -> None:
    assert problems({"cleanup.policy": "delete"}, {"cleanup.policy": "compact"}) == [
        ("cleanup.policy", "delete", "compact", True)]
    assert problems({"cleanup.policy": "compact"}, {"cleanup.policy": "delete"}) == [
        ("cleanup.policy", "compact", "delete", True)]
    assert problems({"cleanup.policy": "delete"}, {"cleanup.policy": "compact,delete"})[0][3]
    assert problems({"cleanup.policy": "compact,delete"}, {"cleanup.policy": "delete,compact"}
                    ) == []


def test_retention_shorter_is_an_error_longer_a_warning() -> None:
    assert problems({"retention.ms": "-1"}, {"retention.ms": str(7 * 86_400_000)}) == [
        ("retention.ms", "for ever", "7 days", True)]
    assert problems({"retention.ms": str(30 * 86_400_000)}, {"retention.ms": "3600000"}) == [
        ("retention.ms", "30 days", "1 hour", True)]
    assert problems({"retention.ms": DAY}, {"retention.ms": "-1"}) == [
        ("retention.ms", "1 day", "for ever", False)]
    assert problems({"retention.ms": DAY}, {"retention.ms": str(2 * 86_400_000)}) == [
        ("retention.ms", "1 day", "2 days", False)]
    assert problems({"retention.bytes": "-1"}, {"retention.bytes": "1073741824"}) == [
        ("retention.bytes", "unlimited", "1073741824 bytes", True)]
    assert problems({"retention.ms": "-1"}, {"retention.ms": "-1"}) == []


def test_max_message_bytes_smaller_is_an_error_larger_is_fine() -> None:
    want = {"max.message.bytes": str(8 << 20)}
    assert problems(want, {"max.message.bytes": "1048588"}) == [
        ("max.message.bytes", str(8 << 20), "1048588", True)]
    assert problems(want, {"max.message.bytes": str(16 << 20)}) == []


def test_settings_the_broker_does_not_report_are_not_compared() -> None:
    assert problems({"retention.ms": "-1", "cleanup.policy": "delete"}, {}) == []


def test_fixes_name_the_command() -> None:
    (part,) = compare_topic("p.cbt.sync.planned", (4, {}), (6, {}), co_partitioned=True,
                            connect=CONNECT)
    assert "kafka-topics.sh --bootstrap-server k1:9092 --delete --topic p.cbt.sync.planned" \
        in part.fix and "cbtstream topics create" in part.fix
    (ret,) = compare_topic("p.cbt.sync.planned", (4, {"retention.ms": "-1"}),
                           (4, {"retention.ms": DAY}), co_partitioned=True, connect=CONNECT)
    assert ret.fix == ("kafka-configs.sh --bootstrap-server k1:9092 --alter --entity-type topics "
                       "--entity-name p.cbt.sync.planned --add-config retention.ms=-1")
    assert str(ret).startswith("topic p.cbt.sync.planned: retention.ms is 1 day, expected "
                               "for ever (records would be deleted")


def test_secured_cluster_fix_takes_the_client_config() -> None:
    k = K.model_copy(update={"security_protocol": "SASL_SSL"})
    actual = {name: (4, {**cfg, "retention.ms": "1"} if "retention.ms" in cfg else cfg)
              for name, (_, cfg) in catalogue_layout(k).items()}
    report = layout_report(k, catalogue_layout(k), actual)
    assert report.problems
    assert all("--command-config" in p.fix for p in report.problems)


def test_report_names_topic_expected_actual_and_advice(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    layout = catalogue_layout(K)
    actual = dict(layout)
    actual["p.cbt.sync.planned"] = (6, {"cleanup.policy": "delete", "retention.ms": "-1"})
    actual["p.cbt.sync.failed"] = (4, {"cleanup.policy": "delete", "retention.ms": "-1"})
    del actual["p.cbt.disk.skipped"]
    report = layout_report(K, layout, actual)
    assert report.missing == ("p.cbt.disk.skipped",)
    with caplog.at_level(logging.WARNING, "cbtstream.kafka"), \
            pytest.raises(TopicsMismatch) as info:
        report.enforce()
    message = str(info.value)
    assert "topic p.cbt.sync.planned: the partition count is 6, expected 4" in message
    assert "Never add partitions" in message and "re-hashes" in message
    assert "p.cbt.sync.failed" not in message  # a longer retention is only a warning...
    assert "p.cbt.sync.failed: retention.ms is for ever, expected 90 days" in caplog.text


def test_hint_when_every_topic_shares_another_count() -> None:
    layout = catalogue_layout(K)
    actual = {name: (6, cfg) for name, (_, cfg) in layout.items()}
    report = layout_report(K, layout, actual)
    assert all(p.setting == PARTITIONS for p in report.problems)
    assert {p.topic for p in report.problems} == {
        n for n in layout
        if n not in ("p.cbt.deadletter", "p.cbt.changeid.fences", "p.cbt.schedule.events",
                     "p.cbt.vm.described", "p.cbt.vm.holds", "p.cbt.vm.cutovers")}
    assert "set kafka.partitions = 6 (CBTSTREAM_KAFKA__PARTITIONS=6)" in report.hint

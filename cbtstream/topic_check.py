"""Whether the topics that exist are the ones cbtstream expects: the rules (pure functions)
and the report they make.

The expected layout is the catalogue (``schemas.topics``, :func:`catalogue_layout`) or, for the
planner worker, every topic it consumes or writes (its changelogs and internal topics
included). :func:`compare_topic` says which differences are errors (cbtstream refuses to run:
``cbtstream topics create``, the worker at start) and which are warnings, and why;
``cbtstream.kafka`` reads the cluster and applies them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cbtstream.config import KafkaSettings
from cbtstream.errors import CbtStreamError
from schemas.topics import ALL_TOPICS, CONTROL_TOPICS, DEADLETTER

log = logging.getLogger("cbtstream.kafka")

#: What a topic should look like: its partition count and creation config, by full name.
TopicLayout = dict[str, tuple[int, dict[str, str]]]


def catalogue_layout(settings: KafkaSettings) -> TopicLayout:
    """Every topic of the catalogue (``schemas.topics``) as ``create_topics`` creates it."""
    return {spec.full_name(settings.topic_prefix): (settings.partitions, dict(spec.config))
            for spec in (*ALL_TOPICS, *CONTROL_TOPICS)}


#: The name :class:`TopicProblem` gives a topic's partition count.
PARTITIONS = "the partition count"
#: Why partitions are never added, and what to do instead (after a partition count error).
REPARTITION_ADVICE = (
    "Never add partitions to a topic (kafka-topics.sh --alter --partitions): Kafka re-hashes "
    "keys, so a disk's new events would land in another partition than its earlier events "
    "and its table row (its order lost, its committed change ID not found). Topics that hold "
    "data and share one count are kept by setting kafka.partitions "
    "(CBTSTREAM_KAFKA__PARTITIONS) to it; counts that differ between them, or a new count for "
    "an installation in use, mean draining the pipeline and recreating the topics.")

#: Suffix of Faust's assignor topic (one partition, whatever ``kafka.partitions`` says).
_FAUST_LEADER = "-__assignor-__leader"


class TopicsMismatch(CbtStreamError):
    """Existing topics differ from the catalogue in a way that would break cbtstream."""

    reason = "topics_mismatch"


@dataclass(frozen=True)
class TopicProblem:
    """One way an existing topic differs from what cbtstream expects of it."""

    topic: str
    setting: str
    expected: str
    actual: str
    #: True: cbtstream refuses to run on the topic; False: a warning.
    error: bool
    #: What goes wrong because of it.
    why: str
    #: The command or the step that fixes it.
    fix: str

    def __str__(self) -> str:
        return (f"topic {self.topic}: {self.setting} is {self.actual}, expected {self.expected}"
                f" ({self.why}); fix: {self.fix}")


def co_partitioned(name: str, settings: KafkaSettings) -> bool:
    """Whether a topic must have ``kafka.partitions`` partitions: every topic keyed by disk
    (the catalogue's, the worker's changelogs and internal topics), not the dead letters (keyed
    by the original record's key), the control topics (:data:`schemas.topics.CONTROL_TOPICS`:
    the fences, read whole by every worker; the scheduler's events and the VM descriptions,
    keyed by VM) or Faust's assignor topic."""
    loose = {DEADLETTER.full_name(settings.topic_prefix),
             *(t.full_name(settings.topic_prefix) for t in CONTROL_TOPICS)}
    return name not in loose and not name.endswith(_FAUST_LEADER)


def _limit(value: str) -> float:
    n = int(value)
    return float("inf") if n < 0 else float(n)


def _human(key: str, value: str) -> str:
    n = int(value)
    if key == "retention.ms":
        if n < 0:
            return "for ever"
        for unit, ms in (("day", 86_400_000), ("hour", 3_600_000), ("minute", 60_000)):
            if n % ms == 0:
                return f"{n // ms} {unit}{'' if n == ms else 's'}"
        return f"{n} ms"
    return "unlimited" if n < 0 else f"{n} bytes"


def _policies(value: str) -> frozenset[str]:
    return frozenset(p.strip() for p in value.strip("[]").split(",") if p.strip())


def compare_topic(name: str, expected: tuple[int, dict[str, str]],
                  actual: tuple[int, dict[str, str]], *, co_partitioned: bool,
                  connect: str) -> list[TopicProblem]:
    """How an existing topic (``actual``: partitions, config) differs from what cbtstream
    expects of it; ``connect`` is the admin tools' connection arguments, for the fixes.

    Errors (cbtstream refuses to run) and warnings, and why:

    * **Partition count** of a co-partitioned topic (:func:`co_partitioned`): an error. The
      planner's table is co-partitioned with its sources: a disk's row lives in the changelog
      partition numbered like its events' partition, which holds only while every such topic
      has ``kafka.partitions`` partitions; otherwise a disk's events reach a worker that does
      not hold its row. Adding partitions is no fix: Kafka re-hashes keys, so a disk's new
      events land in another partition than its earlier events and its row (per-disk order
      lost, its committed change ID not found). Other topics: not compared.
    * **cleanup.policy** different: an error. ``compact`` where the catalogue says ``delete``
      keeps only the latest record of each disk (the plans and the audit log of record lose
      their history); ``delete`` where it says ``compact`` lets the table's rows and the fences
      expire (a worker restarted after that forgets committed change IDs and fences).
    * **retention.ms / retention.bytes** shorter than the catalogue's (-1: for ever): an error,
      records would be deleted while cbtstream needs them (commits and plans are kept for ever;
      a planner catching up after an outage reads snapshots up to 30 days old). Longer: a
      warning: more disk, nothing breaks, and a site may keep records longer on purpose.
    * **max.message.bytes** smaller: an error (a dead letter keeping a large record whole would
      be refused, so that record could be neither processed nor set aside). Larger: fine.
    * Any other setting of the catalogue's config that differs: a warning.

    Not compared: the replication factor (a cluster's policy) and settings the catalogue leaves
    to the broker.
    """
    problems: list[TopicProblem] = []
    (want_parts, want_cfg), (have_parts, have_cfg) = expected, actual
    if co_partitioned and have_parts != want_parts:
        problems.append(TopicProblem(
            name, PARTITIONS, str(want_parts), str(have_parts), True,
            "every disk-keyed topic and the planner's changelogs need kafka.partitions "
            "partitions, so that a disk's events and its table row share a partition number",
            "if it holds nothing you need (a new installation), delete it (kafka-topics.sh "
            f"{connect} --delete --topic {name}) and run `cbtstream topics create`; else see "
            "below"))
    for key, want in want_cfg.items():
        have = have_cfg.get(key)
        if have is None or have == want:
            continue
        alter = (f"kafka-configs.sh {connect} --alter --entity-type topics --entity-name {name} "
                 f"--add-config {key}={want}")
        if key == "cleanup.policy":
            if _policies(have) == _policies(want):
                continue
            why = ("compaction keeps only the latest record of each key: this topic's history "
                   "would be lost" if "compact" in _policies(have) - _policies(want) else
                   "this topic must keep the latest record of every key for ever; with delete "
                   "it expires after retention.ms")
            problems.append(TopicProblem(name, key, want, have, True, why, alter))
        elif key in ("retention.ms", "retention.bytes"):
            try:
                shorter = _limit(have) < _limit(want)
                want_h, have_h = _human(key, want), _human(key, have)
            except ValueError:
                problems.append(TopicProblem(name, key, want, have, False, "not a number", alter))
                continue
            if shorter:
                problems.append(TopicProblem(
                    name, key, want_h, have_h, True, "records would be deleted while cbtstream "
                    "still needs them", alter))
            else:
                problems.append(TopicProblem(
                    name, key, want_h, have_h, False, "records are kept longer than the "
                    "catalogue keeps them: more disk, nothing breaks", "if unintended: " + alter))
        elif key == "max.message.bytes":
            if int(have) < int(want):
                problems.append(TopicProblem(
                    name, key, want, have, True, "a large record would be refused", alter))
        else:
            problems.append(TopicProblem(name, key, want, have, False,
                                         "differs from the catalogue", alter))
    return problems


def admin_tool_args(settings: KafkaSettings) -> str:
    """How Kafka's admin tools (``kafka-configs.sh``...) reach the cluster, for messages."""
    args = f"--bootstrap-server {settings.bootstrap_servers.split(',')[0].strip()}"
    if settings.security_protocol != "PLAINTEXT":
        args += " --command-config CLIENT.properties"  # the site's TLS/SASL client settings
    return args


@dataclass(frozen=True)
class TopicReport:
    """Existing topics next to what cbtstream expects of them (:func:`compare_topic`)."""

    problems: tuple[TopicProblem, ...] = ()
    #: Expected topics that do not exist.
    missing: tuple[str, ...] = ()
    #: Advice after a partition count error (why not add partitions, what to do instead).
    hint: str = ""

    def enforce(self) -> None:
        """Log the warnings; raise :class:`TopicsMismatch` naming every error."""
        for p in self.problems:
            if not p.error:
                log.warning("topic differs from the catalogue: %s", p, extra={"topic": p.topic})
        errors = [p for p in self.problems if p.error]
        if errors:
            lines = "".join(f"\n  - {p}" for p in errors)
            raise TopicsMismatch(
                f"{len(errors)} topic setting(s) differ from the catalogue (schemas/topics.py) "
                f"in a way that would break cbtstream:{lines}{self.hint}")


def layout_report(settings: KafkaSettings, expected: TopicLayout, actual: TopicLayout
                  ) -> TopicReport:
    """Compare the topics that exist (``actual``) with ``expected`` (pure)."""
    connect = admin_tool_args(settings)
    problems = [p for name, want in expected.items() if name in actual
                for p in compare_topic(name, want, actual[name], connect=connect,
                                       co_partitioned=co_partitioned(name, settings))]
    counts = {actual[n][0] for n in expected if n in actual and co_partitioned(n, settings)}
    hint = ""
    if any(p.setting == PARTITIONS for p in problems):
        hint = "\n" + REPARTITION_ADVICE
        if len(counts) == 1:
            m = counts.pop()
            hint += (f" Every existing disk-keyed topic has {m} partitions: to use them as they "
                     f"are, set kafka.partitions = {m} (CBTSTREAM_KAFKA__PARTITIONS={m}).")
    return TopicReport(tuple(problems), tuple(n for n in expected if n not in actual), hint)

"""``cbtstream topics``: create, check or list cbtstream's topics.

``create`` and ``check`` compare the topics that exist with the catalogue
(``cbtstream.topic_check``): a partition count that breaks co-partitioning, another cleanup
policy or a shorter retention is an error (``create`` creates nothing and exits 1, naming the
topic, the expected and actual values and the fix); a longer retention is a warning.
"""

from __future__ import annotations

import argparse
import asyncio

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "topics",
        help="create, check or list the Kafka topics",
        description="'create' creates every cbtstream topic with its partition count and "
        "retention (idempotent), after checking those that exist: it refuses (exit 1) a "
        "partition count other than kafka.partitions (co-partitioning), another cleanup "
        "policy or a shorter retention than the catalogue's, naming the fix. 'check' only "
        "compares (exit 1 on an error or a missing topic). 'list' prints the catalogue: name, "
        "event types, config.",
    )
    p.add_argument("action", choices=("create", "check", "list"))
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.topics import ALL_TOPICS, CONTROL_TOPICS

    if args.action == "list":
        for spec in (*ALL_TOPICS, *CONTROL_TOPICS):
            types = ",".join(t.__name__ for t in spec.value_types)
            cfg = " ".join(f"{k}={v}" for k, v in spec.config.items())
            print(f"{spec.full_name(settings.kafka.topic_prefix)}\t{types}\t{cfg}")
        return 0
    if args.action == "check":
        return check(settings)
    from cbtstream.kafka import create_topics

    created = asyncio.run(create_topics(settings.kafka))
    for name in created:
        print(f"created {name}")
    if not created:
        print("all topics exist")
    return 0


def check(settings: Settings) -> int:
    from cbtstream.kafka import check_topics

    report = asyncio.run(check_topics(settings.kafka))
    for p in report.problems:
        print(f"{'error' if p.error else 'warning'}: {p}")
    for name in report.missing:
        print(f"missing: {name} (`cbtstream topics create` creates it)")
    errors = sum(p.error for p in report.problems)
    if errors:
        print(report.hint.strip() or "", end="\n" if report.hint else "")
    print(f"{errors} error(s), {len(report.problems) - errors} warning(s), "
          f"{len(report.missing)} missing")
    return 1 if errors or report.missing else 0

"""``cbtstream topics``: create or list cbtstream's topics."""

from __future__ import annotations

import argparse
import asyncio

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "topics",
        help="create or list the Kafka topics",
        description="'create' creates every cbtstream topic with its partition count and "
        "retention (idempotent). 'list' prints the catalogue: name, event types, config.",
    )
    p.add_argument("action", choices=("create", "list"))
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.topics import ALL_TOPICS

    if args.action == "list":
        for spec in ALL_TOPICS:
            types = ",".join(t.__name__ for t in spec.value_types)
            cfg = " ".join(f"{k}={v}" for k, v in spec.config.items())
            print(f"{spec.full_name(settings.kafka.topic_prefix)}\t{types}\t{cfg}")
        return 0
    from cbtstream.kafka import create_topics

    created = asyncio.run(create_topics(settings.kafka))
    for name in created:
        print(f"created {name}")
    if not created:
        print("all topics exist")
    return 0

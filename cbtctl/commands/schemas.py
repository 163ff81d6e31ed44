"""``cbtstream schemas``: write or check the JSON Schema files of the events."""

from __future__ import annotations

import argparse

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "schemas",
        help="generate or check the events' JSON Schemas",
        description="Write schemas/json/<event>.schema.json from the pydantic models, or check "
        "that the committed files match the models (exit 1 on drift).",
    )
    p.add_argument("action", choices=("generate", "check"))
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.jsonschema import drift, write_all

    if args.action == "generate":
        for path in write_all():
            print(path)
        return 0
    stale = drift()
    for name in stale:
        print(f"stale: {name}")
    return 1 if stale else 0

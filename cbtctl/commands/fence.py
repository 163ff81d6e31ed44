"""``cbtstream fence``: distrust change IDs issued before a time, for a VM, a host, a vCenter or
everything (e.g. ESXi hosts affected by a CBT bug such as VMware KB 317933 before the patch).

Publishes a ``ChangeIdFence`` to the compacted ``cbt.changeid.fences``; every planner worker
reads it (``streams/fences.py``), and the next sync of each disk whose committed change ID is
older than ``--before`` within the scope is full with reason ``fenced`` (``streams/fence.py``).
The fence id is derived from scope, target and time, so running the same command twice
publishes the same fence. ``--revoke ID`` ends a fence; ``--list`` shows them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import UTC, datetime

from cbtstream.config import Settings
from cbtstream.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fence", help="distrust change IDs issued before a time (next syncs full: 'fenced')",
        description=__doc__)
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--vm", help="a VM: instance uuid, inventory path or name")
    scope.add_argument("--host", help="an ESXi host name (as vCenter names it)")
    scope.add_argument("--vcenter", help="a vCenter (URL or host[:port])")
    scope.add_argument("--all", action="store_true", help="every disk")
    scope.add_argument("--revoke", metavar="FENCE_ID", help="end the fence with this id")
    scope.add_argument("--list", action="store_true", help="list every fence")
    p.add_argument("--before", help="ISO 8601 time with a zone (e.g. 2024-06-01T00:00:00Z); "
                   "change IDs of snapshots taken before it are untrusted")
    p.add_argument("--reason", help="why (kept in the fence, shown by status and replay)")
    p.set_defaults(handler=run)


def parse_time(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--before {text!r} is not an ISO 8601 time") from exc
    if t.tzinfo is None:
        raise ConfigError("--before needs a time zone (e.g. 'Z' or '+02:00')")
    return t.astimezone(UTC)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from cbtstream.kafka import Publisher
    from schemas.events import ChangeIdFence, FenceScope
    from streams.fences import read_fences

    if args.list:
        for f in await read_fences(settings.kafka):
            print(f.model_dump_json())
        return 0
    if args.revoke:
        fences = {str(f.fence_id): f for f in await read_fences(settings.kafka)}
        old = fences.get(args.revoke)
        if old is None:
            raise ConfigError(f"no fence {args.revoke}")
        fence = old.model_copy(update={"event_id": uuid.uuid4(), "revoked": True,
                                       "occurred_at": datetime.now(UTC)})
    else:
        if not args.before or not args.reason:
            raise ConfigError("a fence needs --before TIME and --reason TEXT")
        scope, target = next((s, t) for s, t in (
            (FenceScope.VM, args.vm), (FenceScope.HOST, args.host),
            (FenceScope.VCENTER, args.vcenter), (FenceScope.ALL, None if not args.all else ""))
            if t is not None)
        before = parse_time(args.before)
        fence_id = uuid.uuid5(uuid.NAMESPACE_URL,
                              f"cbtstream-fence:{scope}:{target or ''}:{before.isoformat()}")
        try:
            fence = ChangeIdFence(fence_id=fence_id, scope=scope, target=target or None,
                                  before=before, reason=args.reason)
        except ValueError as exc:
            raise ConfigError(f"invalid fence: {exc}") from exc
    async with Publisher(settings.kafka) as pub:
        await pub.publish(fence)
    print(json.dumps(fence.model_dump(mode="json")))
    return 0

"""``cbtstream pools``: the copier pools, their live copiers and disks; moving a disk between
pools.

``pools list`` reads the plans in the log (the pool of each disk's latest plan) and describes
each pool's consumer group (its live copiers, ``client_id@host``): a pool with disks and no
copier has its plans waiting (the worker leaves them alone and reports them:
``cbtstream_syncs_waiting_for_pool``).

``pools move DISK --to POOL`` moves a disk's replica to another pool. The new pool holds nothing
of it, so its next sync is a full copy there (reason ``pool_moved``); the replica in the old
pool is left as it is (remove it by hand once the new one is committed). It says so and does
nothing without ``--yes``. The request goes to the worker in the disk's partition (the internal
``<app id>-sync-checks`` topic, ``streams/pools.py``); a sync running now finishes in the old
pool first.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
from datetime import UTC, datetime

from cbtstream.config import Settings
from cbtstream.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pools", help="copier pools: live copiers, disks; move a disk to a pool",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_subparsers(dest="action", required=True, metavar="{list,move}")
    ls = what.add_parser("list", help="each pool's live copiers and disks (JSON lines)")
    ls.set_defaults(handler=run_list)
    mv = what.add_parser("move", help="move a disk's replica to another pool (a full copy)")
    mv.add_argument("disk", metavar="DISK_KEY", help="<vm instance uuid>/disk-<device key>")
    mv.add_argument("--to", required=True, metavar="POOL", help="the pool to move it to")
    mv.add_argument("--yes", action="store_true",
                    help="do it (without: say what it would cost and stop)")
    mv.set_defaults(handler=run_move)


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_list(settings))


async def _list(settings: Settings) -> int:
    from collections import Counter

    from cbtctl.replay.reader import StartAt
    from cbtctl.replay.run import load
    from cbtstream.kafka import copier_group_id, group_members
    from schemas.events import DEFAULT_POOL

    result = await load(settings, StartAt())
    disks: Counter[str] = Counter()
    for lin in result.disks.values():
        if lin.plans:
            latest = max(lin.plans.values(), key=lambda pc: pc[0].generation)[0]
            disks[latest.pool] += 1
    prefix = settings.kafka.topic_prefix
    names = sorted({DEFAULT_POOL, settings.pools.default, settings.copier.pool,
                    *(a.pool for a in settings.pools.assign), *disks})
    members = await group_members(settings.kafka, [copier_group_id(prefix, p) for p in names])
    for pool in names:
        group = copier_group_id(prefix, pool)
        copiers = members.get(group)  # None: the broker did not describe the group
        print(json.dumps({"pool": pool, "group": group, "copiers": copiers,
                          "disks": disks.get(pool, 0),
                          "waiting_for_copier": bool(disks.get(pool)) and copiers == []}))
    return 0


def run_move(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_move(args, settings))


async def _move(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from cbtctl.replay.reader import StartAt
    from cbtctl.replay.run import load
    from cbtstream.kafka import Publisher
    from schemas.disk import parse_disk_key
    from streams.pools import PoolMove, checks_topic

    try:
        parse_disk_key(args.disk)
        move = PoolMove(disk_key=args.disk, pool=args.to, at=datetime.now(UTC),
                        requested_by=getpass.getuser()[:128])
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"cannot move {args.disk!r} to {args.to!r}: {exc}") from exc
    lin = (await load(settings, StartAt(), disk=args.disk)).disks.get(args.disk)
    if lin is None or not lin.plans:
        raise ConfigError(f"disk {args.disk} has no plan in the log: nothing to move (a new "
                          "disk takes the pool [pools] gives it)")
    plan = max(lin.plans.values(), key=lambda pc: pc[0].generation)[0]
    if plan.pool == args.to:
        print(f"disk {args.disk} is in pool {args.to!r} already; nothing to do")
        return 0
    size = plan.disk.capacity_bytes
    shown = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    print(f"disk {args.disk} ({plan.disk.vm_name}) moves from pool {plan.pool!r} to "
          f"{args.to!r}: its next sync copies the whole disk ({shown}) into pool "
          f"{args.to!r}; the replica in {plan.pool!r} stays as it is until you remove it.")
    if not args.yes:
        print("nothing done: run again with --yes to move it")
        return 1
    async with Publisher(settings.kafka) as pub:
        await pub.publish_raw(checks_topic(settings), args.disk.encode(),
                              move.model_dump_json().encode(), [])
    print(json.dumps(move.model_dump(mode="json")))
    return 0

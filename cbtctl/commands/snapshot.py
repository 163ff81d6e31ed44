"""``cbtstream snapshot``: snapshot VMs and publish one SnapshotTaken per disk."""

from __future__ import annotations

import argparse
import asyncio

from cbtstream.config import Settings, VSphereSettings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "snapshot",
        help="snapshot VMs and publish one SnapshotTaken per disk",
        description="Take ONE vSphere snapshot per VM (all disks) and publish a SnapshotTaken "
        "event per disk, carrying that disk's change ID from the snapshot's config. Prints one "
        "JSON line per published event (DiskSkipped for disks the snapshot does not capture: "
        "independent disks, physical RDMs). Before them it publishes the VM's description "
        "(VmDescribed on cbt.vm.described: firmware, CPUs, memory, guest OS, disks, NICs), not "
        "printed (`cbtstream audit vms`); a description that cannot be read is a warning, the "
        "disk events are published anyway. With --every, repeats on an interval until stopped. "
        "A VM whose CBT is not in effect is refused (exit 1, nothing published) unless "
        "--enable-cbt is given.",
    )
    p.add_argument("vms", nargs="+", metavar="VM",
                   help="instance UUID (config.instanceUuid) or inventory path (/DC/vm/name)")
    p.add_argument("--vcenter", metavar="URL", help="SDK URL, e.g. https://vc.example/sdk "
                   "(default: vsphere.url)")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server's TLS certificate (labs and the simulator)")
    p.add_argument("--quiesce", action="store_true", help="quiesce the guest file systems")
    p.add_argument("--enable-cbt", action="store_true",
                   help="turn CBT on first where it is off (reconfigure + stun snapshot); "
                   "without it a VM whose CBT is not in effect is refused")
    p.add_argument("--every", metavar="INTERVAL", help="repeat every INTERVAL (30s, 15m, 1h), "
                   "the VMs one after another; for a site use `cbtstream schedule`")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from producers.scheduler import parse_interval

    every = None
    if args.every:
        try:
            every = parse_interval(args.every)
        except ValueError as exc:
            from cbtstream.errors import ConfigError

            raise ConfigError(str(exc)) from exc
    from cbtctl.commands.vsphere_args import vsphere_settings

    vsettings = vsphere_settings(args, settings.vsphere)
    return asyncio.run(_run(args, settings, vsettings, every))


async def _run(args: argparse.Namespace, settings: Settings, vsettings: VSphereSettings,
               every: float | None) -> int:
    from cbtstream.kafka import Publisher
    from cbtstream.vsphere.adapter import VSphereClient
    from producers.scheduler import run_schedule
    from producers.snapshot import snapshot_and_publish
    from schemas.events import SnapshotTaken

    def emit(events: list[SnapshotTaken]) -> None:
        for event in events:
            print(event.model_dump_json(), flush=True)

    async with VSphereClient(vsettings) as client, Publisher(settings.kafka) as publisher:
        if every is None:
            for vm in args.vms:
                emit(await snapshot_and_publish(
                    client, publisher, vm, quiesce=args.quiesce, enable_cbt=args.enable_cbt,
                    on_skipped=lambda s: print(s.model_dump_json(), flush=True)))
            return 0
        failures = await run_schedule(client, publisher, args.vms, every, on_events=emit,
                                      enable_cbt=args.enable_cbt)
        return 1 if failures else 0

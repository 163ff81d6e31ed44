"""``cbtstream cutover VM``: the end of a migration. Stop the VM, take its final snapshot, wait
for every disk's final sync, prove each replica equal to that snapshot, mark the VM ``cut_over``
(later snapshots are refused, the replicas are never written again) and publish
``CutoverCompleted`` with each replica's location and digest and the VM's description for the
target platform. The steps and their order: ``cbtctl/cutover.py``.

Run it on the copier host that keeps the VM's replicas, with the pipeline (planner worker and
copier) running. A VM that is powered on is refused unless told how to stop it.

Exit code 0 when the VM is cut over; 1 when it was refused before anything was done (a running
VM without --shutdown or --power-off, no replica on this host) or a step failed (the message
says which; nothing is held then: fix the cause and run it again).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cutover", help="stop a VM, copy and prove its final state, and hand its replicas "
        "and description to the target platform (CutoverCompleted)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vm", metavar="VM", help="instance uuid or inventory path (/DC/vm/name)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--shutdown", action="store_true",
                     help="shut the guest down through VMware Tools and wait for power-off")
    how.add_argument("--power-off", action="store_true",
                     help="power the VM off (as pulling the plug: the guest is not asked)")
    p.add_argument("--shutdown-timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for the guest to power off (default 300)")
    p.add_argument("--wait", type=float, default=3600.0, metavar="S",
                   help="seconds to wait for the final syncs (default 3600)")
    p.add_argument("--reason", default="", help="why (kept in the hold and the event)")
    p.add_argument("--keep-snapshot", action="store_true",
                   help="leave the final snapshot on the VM (default: removed once proven)")
    p.add_argument("--vcenter", metavar="URL", help="SDK URL (default: vsphere.url)")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server's TLS certificate (labs and the simulator)")
    p.add_argument("--json", action="store_true",
                   help="print the CutoverCompleted event (one JSON line) instead of a summary")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cbtctl.commands.vsphere_args import vsphere_settings
    from cbtctl.cutover import CutoverFailed, CutoverRequest, Stop, Timeline, run_cutover
    from cbtstream.vsphere.adapter import VSphereClient

    stop: Stop | None = ("shutdown" if args.shutdown else "power_off" if args.power_off
                         else None)
    req = CutoverRequest(vm=args.vm, stop=stop, shutdown_timeout_s=args.shutdown_timeout,
                         wait_s=args.wait, reason=args.reason, keep_snapshot=args.keep_snapshot)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    timeline = Timeline(say=say)

    async def go() -> int:
        async with VSphereClient(vsphere_settings(args, settings.vsphere)) as client:
            try:
                done = await run_cutover(req, settings, client, timeline)
            except CutoverFailed as exc:
                say(f"cutover of {args.vm} not completed: {exc}")
                return 1
        if args.json:
            print(done.model_dump_json())
        else:
            for d in done.disks:
                print(f"disk-{d.disk.device_key}  {d.replica_location}  {d.replica_digest}")
        return 0

    return asyncio.run(go())

"""``cbtstream cbt enable|disable|status VM...``: switch Changed Block Tracking and show it.

``enable``/``disable`` reconfigure the VM and then create and remove one snapshot, because ESXi
applies the switch only at the VM's next stun (VMware KB 1031873); they print the state read
back afterwards, one JSON line per VM. ``status`` prints, per VM, whether CBT is asked for
(``enabled``, ``config.changeTrackingEnabled``) and in effect (``active``: every disk a snapshot
captures has a change ID). Exit 1 when any VM failed, or for ``status`` when any VM's CBT is not
in effect.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from cbtstream.config import Settings, VSphereSettings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cbt", help="enable, disable or show Changed Block Tracking of VMs",
                       description=__doc__)
    p.add_argument("action", choices=("enable", "disable", "status"))
    p.add_argument("vms", nargs="+", metavar="VM",
                   help="instance UUID (config.instanceUuid) or inventory path (/DC/vm/name)")
    p.add_argument("--vcenter", metavar="URL", help="SDK URL (default: vsphere.url)")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server's TLS certificate (labs and the simulator)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cbtctl.commands.vsphere_args import vsphere_settings

    return asyncio.run(_run(args, vsphere_settings(args, settings.vsphere)))


async def _run(args: argparse.Namespace, vsettings: VSphereSettings) -> int:
    from cbtstream.errors import CbtStreamError
    from cbtstream.vsphere.adapter import VSphereClient
    from producers.cbt import set_cbt
    from producers.snapshot import resolve_vm

    rc = 0
    async with VSphereClient(vsettings) as client:
        for selector in args.vms:
            try:
                vm = await resolve_vm(client, selector)
                if args.action == "status":
                    status = await client.cbt_status(vm)
                else:
                    status = await set_cbt(client, vm, args.action == "enable")
            except CbtStreamError as exc:
                print(json.dumps({"vm": selector, "error": str(exc), "reason": exc.reason}),
                      flush=True)
                rc = 1
                continue
            if args.action == "status" and not status.active:
                rc = 1
            print(json.dumps({"vm": vm.instance_uuid, "path": vm.path,
                              "enabled": status.enabled, "active": status.active}), flush=True)
    return rc

"""``cbtstream vm describe VM [--json]``: what a failover or cutover would recreate the VM as.

Reads the VM's description from vSphere now (``schemas/vm.py``: firmware and secure boot, CPUs,
memory, guest OS, hardware version, power state and VMware Tools, the disks in controller order
with controller, bus and unit, the NICs with MAC address and network) and prints it as a table,
or with ``--json`` as one JSON object (the ``VmDescription`` schema, for jq). VM: instance UUID
(config.instanceUuid) or inventory path (/DC/vm/name). Exit 1 when the VM cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from cbtstream.config import Settings, VSphereSettings
from schemas.vm import VmDescription


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vm", help="describe a VM as a target platform would recreate it",
                       description=__doc__)
    p.add_argument("action", choices=("describe",))
    p.add_argument("vm", metavar="VM",
                   help="instance UUID (config.instanceUuid) or inventory path (/DC/vm/name)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.add_argument("--vcenter", metavar="URL", help="SDK URL (default: vsphere.url)")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server's TLS certificate (labs and the simulator)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cbtctl.commands.vsphere_args import vsphere_settings

    desc = asyncio.run(_describe(args.vm, vsphere_settings(args, settings.vsphere)))
    print(desc.model_dump_json() if args.json else render(desc), flush=True)
    return 0


async def _describe(selector: str, vsettings: VSphereSettings) -> VmDescription:
    from cbtstream.vsphere.adapter import VSphereClient
    from producers.snapshot import resolve_vm

    async with VSphereClient(vsettings) as client:
        return await client.describe_vm(await resolve_vm(client, selector))


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{size:.1f} {units[0]}"


def render(d: VmDescription) -> str:
    """The description as an operator reads it: facts, then disks, then NICs."""
    boot = d.firmware + (" (secure boot)" if d.secure_boot else "")
    facts = [
        ("VM", f"{d.name}  {d.vm_path}"),
        ("instance uuid", d.vm_instance_uuid),
        ("bios uuid", d.bios_uuid),
        ("vcenter / host", f"{d.vcenter} / {d.esxi_host or '-'}"),
        ("power", f"{d.power_state}, tools {d.tools_running_status or '-'}"),
        ("firmware", boot),
        ("cpu", f"{d.num_cpus} ({d.cores_per_socket} per socket)"),
        ("memory", f"{d.memory_mib} MiB"),
        ("guest os", f"{d.guest_id} ({d.guest_full_name})" if d.guest_full_name
         and d.guest_full_name != d.guest_id else d.guest_id),
        ("hardware", d.hardware_version),
    ]
    out = [f"{k + ':':<15} {v}" for k, v in facts]
    out += ["", f"disks ({len(d.disks)}, in controller order)"]
    out += _columns(
        ("KEY", "CONTROLLER", "BUS:UNIT", "SIZE", "MODE", "THIN", "CAPTURED", "FILE"),
        [(str(k.device_key), f"{k.controller}/{k.controller_model}",
          f"{k.bus_number}:{k.unit_number}", _size(k.capacity_bytes), k.disk_mode or "-",
          {True: "yes", False: "no", None: "-"}[k.thin_provisioned],
          "yes" if k.captured else f"no ({k.skip_reason})", k.backing_file)
         for k in d.disks])
    out += ["", f"nics ({len(d.nics)})"]
    out += _columns(
        ("KEY", "ADAPTER", "MAC", "ADDRESS", "NETWORK", "CONNECTED"),
        [(str(n.device_key), n.adapter_type, n.mac_address, n.address_type or "-", n.network,
          f"{'yes' if n.connected else 'no'} (at power on: "
          f"{'yes' if n.start_connected else 'no'})")
         for n in d.nics])
    return "\n".join(out)

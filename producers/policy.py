"""Which VMs each protection policy covers (pure): the policies of ``[schedule]`` against one
reading of the inventory and of the tags.

Rules (:func:`resolve`):

- a policy covers the union of its selectors: VMs in a folder (``/DC/vm/prod``, subfolders
  included), on a cluster (by name), carrying a tag (``category/tag`` or ``tag``), whose name
  matches a shell pattern, or named in ``vms`` (instance uuid or inventory path);
- a folder, cluster or tag that does not exist, or a VM of ``vms`` that is not in the inventory,
  is a problem (the rest of the policy still applies); a name pattern may match nothing (it is
  there for VMs yet to come), but a policy that covers no VM at all is a problem;
- a VM covered by several policies with the same RPO and interval goes to the first in the
  configuration's order; with different ones it is a problem naming both policies, and the
  VM goes to the one with the shortest RPO (then interval), so it is never left unprotected.

The scheduler refuses to start while there is a problem (exit 2, each problem naming its
policy) and logs each one as a warning when a later cycle finds it: never a silent skip.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from cbtstream.config import SchedulePolicy
from cbtstream.vsphere.adapter import Inventory, InventoryVm
from cbtstream.vsphere.tags import TagMembers


@dataclass(frozen=True)
class Assignment:
    """A VM and the policy that schedules it."""

    vm: InventoryVm
    policy: SchedulePolicy


@dataclass(frozen=True)
class Problem:
    """Something about the policies an operator must fix; ``kind`` is a metric label."""

    policy: str
    kind: str  # no_match, missing_folder, missing_cluster, missing_tag, missing_vm, conflict
    message: str


@dataclass(frozen=True)
class Resolution:
    """Every VM under a policy (by instance uuid) and the problems found."""

    assignments: dict[str, Assignment]
    problems: tuple[Problem, ...]


def _norm(path: str) -> str:
    return "/" + path.strip("/")


def in_folder(vm: InventoryVm, folder: str) -> bool:
    """``vm`` is in ``folder`` or one of its subfolders."""
    f, here = _norm(folder), _norm(vm.folder)
    return here == f or here.startswith(f + "/")


def covers(policy: SchedulePolicy, vm: InventoryVm, tags: TagMembers) -> bool:
    """Whether one of the policy's selectors selects ``vm``."""
    return (any(in_folder(vm, f) for f in policy.folders)
            or (vm.cluster is not None and vm.cluster in policy.clusters)
            or any(vm.vm.moref in tags.vms.get(t, ()) for t in policy.tags)
            or any(fnmatch.fnmatchcase(vm.vm.name, p) for p in policy.names)
            or any(_names_vm(v, vm) for v in policy.vms))


def _names_vm(selector: str, vm: InventoryVm) -> bool:
    return selector.lower() == vm.vm.instance_uuid or _norm(selector) == vm.vm.path


def _missing(policy: SchedulePolicy, inventory: Inventory, tags: TagMembers) -> list[Problem]:
    name, out = policy.name, []
    for f in policy.folders:
        if _norm(f) not in inventory.folders:
            out.append(Problem(name, "missing_folder",
                               f"policy {name!r}: folder {f!r} does not exist"))
    for c in policy.clusters:
        if c not in inventory.clusters:
            out.append(Problem(name, "missing_cluster",
                               f"policy {name!r}: cluster {c!r} does not exist"))
    for t in policy.tags:
        if t in tags.missing or t not in tags.vms:
            out.append(Problem(name, "missing_tag", f"policy {name!r}: tag {t!r} does not exist"))
    for v in policy.vms:
        if not any(_names_vm(v, vm) for vm in inventory.vms):
            out.append(Problem(name, "missing_vm", f"policy {name!r}: VM {v!r} is not in the "
                                                   "inventory"))
    return out


def _schedule(policy: SchedulePolicy) -> tuple[float, float]:
    return policy.rpo_s, policy.interval_s


def resolve(policies: Sequence[SchedulePolicy], inventory: Inventory,
            tags: TagMembers) -> Resolution:
    """Apply the rules of the module docstring (pure)."""
    problems: list[Problem] = []
    chosen: dict[str, Assignment] = {}
    for policy in policies:
        problems += _missing(policy, inventory, tags)
        matched = [vm for vm in inventory.vms if covers(policy, vm, tags)]
        if not matched:
            problems.append(Problem(policy.name, "no_match",
                                    f"policy {policy.name!r} matches no VM"))
        for vm in matched:
            key = vm.vm.instance_uuid
            held = chosen.get(key)
            if held is None:
                chosen[key] = Assignment(vm, policy)
                continue
            if _schedule(held.policy) == _schedule(policy):
                continue
            winner = min((held.policy, policy), key=_schedule)
            problems.append(Problem(policy.name, "conflict", (
                f"VM {vm.vm.path} ({key}) is claimed by policies {held.policy.name!r} "
                f"(rpo {held.policy.rpo_s:g}s, every {held.policy.interval_s:g}s) and "
                f"{policy.name!r} (rpo {policy.rpo_s:g}s, every {policy.interval_s:g}s); "
                f"{winner.name!r}, the stricter, applies")))
            chosen[key] = Assignment(vm, winner)
    return Resolution(chosen, tuple(problems))


def all_tags(policies: Sequence[SchedulePolicy]) -> list[str]:
    """Every tag any policy names, once each."""
    return sorted({t for p in policies for t in p.tags})

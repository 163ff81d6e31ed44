"""The ``--vcenter URL`` / ``--insecure`` options the vSphere commands share (``snapshot``,
``snapshots``, ``cbt``): one definition of what they override in ``settings.vsphere``."""

from __future__ import annotations

import argparse

from cbtstream.config import VSphereSettings


def vsphere_settings(args: argparse.Namespace, base: VSphereSettings) -> VSphereSettings:
    """``base`` with the command line's ``--vcenter`` and ``--insecure`` applied."""
    update: dict[str, object] = {}
    if args.vcenter:
        update["url"] = args.vcenter
    if args.insecure:
        update["insecure"] = True
    return base.model_copy(update=update)

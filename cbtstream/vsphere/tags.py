"""vSphere tags, read through the vAPI REST endpoint (``/rest/com/vmware/cis/...``).

pyvmomi's SOAP API has no tags: they live in the vAPI service of the same vCenter. The
``/rest`` paths are used because both vCenter (6.5 to 8.x; ``/api`` came in 7.0) and govmomi's
simulator serve them. The session is a ``POST .../cis/session`` with the ``[vsphere]``
credentials (basic auth), its token sent as ``vmware-api-session-id``; TLS is verified exactly
like the SOAP client's (``vsphere.cafile``, or off only with ``vsphere.insecure``).

Calls are blocking (``urllib``) and run in a thread. Errors become
:mod:`cbtstream.vsphere.errors`: a refused login is :class:`VSphereAuthError`, anything else a
transient :class:`VSphereTransient`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from cbtstream.config import VSphereSettings
from cbtstream.vsphere.errors import VSphereAuthError, VSphereError, VSphereTransient

_BASE = "/rest/com/vmware/cis"


@dataclass(frozen=True)
class TagMembers:
    """Which VMs (by moref) carry each tag asked for, and the tags that do not exist."""

    vms: dict[str, frozenset[str]] = field(default_factory=dict)
    missing: tuple[str, ...] = ()


def _wanted(spec: str, name: str, category: str) -> bool:
    """``category/tag`` matches that tag of that category; ``tag`` a tag of any category."""
    if "/" in spec:
        cat, _, tag = spec.partition("/")
        return cat == category and tag == name
    return spec == name


class TagClient:
    """Reads tag attachments of one vCenter (a new vAPI session per :meth:`members` call:
    the scheduler asks once per cycle)."""

    def __init__(self, settings: VSphereSettings, *, timeout: float = 60.0) -> None:
        parts = urlsplit(settings.url)
        self._root = f"https://{parts.netloc}"
        self._settings = settings
        self._timeout = timeout
        self._ctx = ssl.create_default_context(
            cafile=str(settings.cafile) if settings.cafile else None)
        if settings.insecure:
            self._ctx.check_hostname = False
            self._ctx.verify_mode = ssl.CERT_NONE

    async def members(self, tags: Sequence[str]) -> TagMembers:
        """The VMs attached to each of ``tags`` (``category/tag`` or ``tag``)."""
        if not tags:
            return TagMembers()
        return await asyncio.to_thread(self._members, tuple(tags))

    # -- blocking -------------------------------------------------------------------------------
    def _request(self, method: str, path: str, token: str | None = None,
                 doc: Any = None) -> Any:
        req = urllib.request.Request(self._root + path, method=method,
                                     data=None if doc is None else json.dumps(doc).encode())
        req.add_header("Accept", "application/json")
        if doc is not None:
            req.add_header("Content-Type", "application/json")
        if token is None:
            s = self._settings
            login = f"{s.username}:{s.password.get_secret_value()}".encode()
            req.add_header("Authorization", "Basic " + base64.b64encode(login).decode())
        else:
            req.add_header("vmware-api-session-id", token)
        what = f"vAPI {method} {path.split('?')[0]}"
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ctx) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise VSphereAuthError(f"{what}: HTTP {exc.code}") from exc
            raise VSphereTransient(f"{what}: HTTP {exc.code}") from exc
        except ssl.SSLCertVerificationError as exc:
            raise VSphereAuthError(f"{what}: TLS certificate not trusted "
                                   f"({exc.verify_message})") from exc
        except OSError as exc:
            raise VSphereTransient(f"{what}: {exc}") from exc
        try:
            return json.loads(body)["value"] if body else None
        except (ValueError, KeyError, TypeError) as exc:
            raise VSphereError(f"{what}: unexpected answer") from exc

    def _members(self, tags: tuple[str, ...]) -> TagMembers:
        token = str(self._request("POST", f"{_BASE}/session"))
        try:
            categories: dict[str, str] = {}
            for cid in self._request("GET", f"{_BASE}/tagging/category", token) or []:
                info = self._request("GET", f"{_BASE}/tagging/category/id:{quote(cid)}", token)
                categories[cid] = str(info.get("name", ""))
            ids: dict[str, list[str]] = {spec: [] for spec in tags}
            for tid in self._request("GET", f"{_BASE}/tagging/tag", token) or []:
                info = self._request("GET", f"{_BASE}/tagging/tag/id:{quote(tid)}", token)
                name, category = str(info.get("name", "")), categories.get(
                    str(info.get("category_id", "")), "")
                for spec in tags:
                    if _wanted(spec, name, category):
                        ids[spec].append(tid)
            found = sorted({t for v in ids.values() for t in v})
            attached: dict[str, set[str]] = {}
            if found:
                rows = self._request(
                    "POST", f"{_BASE}/tagging/tag-association?~action="
                    "list-attached-objects-on-tags", token, {"tag_ids": found}) or []
                for row in rows:
                    attached[str(row.get("tag_id"))] = {
                        str(o.get("id")) for o in row.get("object_ids") or []
                        if o.get("type") == "VirtualMachine"}
            return TagMembers(
                vms={spec: frozenset().union(*(attached.get(t, set()) for t in tids))
                     for spec, tids in ids.items() if tids},
                missing=tuple(spec for spec, tids in ids.items() if not tids))
        finally:
            with contextlib.suppress(VSphereError):  # it expires on the server anyway
                self._request("DELETE", f"{_BASE}/session", token)

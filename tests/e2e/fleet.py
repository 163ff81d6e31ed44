"""Copier fleets for end-to-end tests: several ``cbtstream copier`` processes on this one
machine, each standing for a host of its own, next to one Faust worker.

A member is one simulated host: its own ``copier.host`` (written in the replica records it
writes), its own ``copier.state_dir`` (ledger, host-local state) and its own VDDK socket folder
(``copier.vddk.run_dir``: on real hosts every copier has its own, and a copier clears the
folders it finds without a live nbdkit when it starts). *Shared storage* is the same
``target_root`` for every member of a pool; *host-local storage* is a ``target_root`` of its
own.

A member may be killed (SIGKILL), stopped (SIGTERM) and started again (same host, same
directories); :meth:`Fleet.check` raises when a process that should run has exited.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiokafka.admin import AIOKafkaAdminClient

from cbtctl.demo.processes import Proc
from cbtstream.config import Settings
from cbtstream.kafka import client_kwargs, copier_group_id
from tests.e2e.conftest import Pipeline, dump_logs


@dataclass
class Member:
    """One copier host of a pool; ``runs`` are its processes, oldest first."""

    name: str
    settings: Settings
    logs: Path
    runs: list[Proc] = field(default_factory=list)
    #: False once the test killed or stopped it on purpose (check() leaves it alone).
    should_run: bool = False

    @property
    def proc(self) -> Proc | None:
        return self.runs[-1] if self.runs else None

    @property
    def pool(self) -> str:
        return self.settings.copier.pool

    def log_lines(self) -> Iterator[dict[str, Any]]:
        """The JSON log lines of every run of this member."""
        for p in self.runs:
            for line in p.output().splitlines():
                if line.startswith("{"):
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue

    def started(self) -> dict[str, str]:
        """sync id -> disk key of every sync this member started (``sync started``)."""
        return {d["sync_id"]: d.get("disk_key", "") for d in self.log_lines()
                if d.get("msg") == "sync started" and "sync_id" in d}

    def copies(self, disk_key: str) -> list[dict[str, Any]]:
        """The ``copied`` lines (the engine's result: ``resumed_from``...) of ``disk_key``."""
        return [d for d in self.log_lines()
                if d.get("msg") == "copied" and d.get("disk_key") == disk_key]


class Fleet:
    """The worker and the copier members of one test (stopped by :meth:`close`)."""

    def __init__(self, base: Settings, logs: Path) -> None:
        self.base = base
        self.logs = logs
        self.pipeline: Pipeline | None = None
        self.members: dict[str, Member] = {}
        # short: unix socket paths are at most 107 bytes
        self._run_root = Path(tempfile.mkdtemp(prefix="cbtf"))

    # -- processes ------------------------------------------------------------------------------
    def start_worker(self, settings: Settings) -> Pipeline:
        self.pipeline = Pipeline(settings, self.logs)
        return self.pipeline

    def member_settings(self, name: str, *, pool: str,
                        storage: Literal["host-local", "shared"], target_root: Path,
                        state_root: Path, base: Settings | None = None) -> Settings:
        """Settings of member ``name`` (host ``host-<name>``) of ``pool``."""
        s = base or self.base
        run_dir = self._run_root / name
        vddk = s.copier.vddk.model_copy(update={"run_dir": run_dir})
        copier = s.copier.model_copy(update={
            "pool": pool, "host": f"host-{name}", "storage": storage,
            "target_root": target_root, "state_dir": state_root / f"state-{name}",
            "vddk": vddk, "nbd_allow": (*s.copier.nbd_allow, f"unix:{run_dir}/")})
        return s.model_copy(update={"copier": copier})

    def start(self, name: str, settings: Settings | None = None) -> Member:
        """Start member ``name`` (again, with the settings it had, when ``settings`` is None)."""
        m = self.members.get(name)
        if m is None:
            assert settings is not None, f"member {name} was never configured"
            m = self.members[name] = Member(name, settings, self.logs)
        n = len(m.runs) + 1
        m.runs.append(Proc(["copier"], m.settings, self.logs / f"copier-{name}-{n}.log"))
        m.should_run = True
        return m

    def kill(self, name: str) -> None:
        m = self.members[name]
        m.should_run = False
        assert m.proc is not None
        m.proc.kill()

    def stop(self, name: str) -> None:
        m = self.members[name]
        m.should_run = False
        assert m.proc is not None
        m.proc.stop()

    def check(self) -> None:
        """Raise if the worker or a member that should run has exited."""
        if self.pipeline is not None:
            self.pipeline.check()
        for m in self.members.values():
            if m.should_run and m.proc is not None and not m.proc.alive:
                raise RuntimeError(f"{m.proc.log.name} exited:\n{m.proc.output()[-4000:]}")

    def close(self) -> None:
        for m in self.members.values():
            for p in m.runs:
                p.stop()
        if self.pipeline is not None:
            self.pipeline.stop()
        shutil.rmtree(self._run_root, ignore_errors=True)

    def dump(self) -> str:
        return dump_logs(self.logs)

    def who_started(self, sync_id: str) -> list[str]:
        """The members whose logs say they started ``sync_id``."""
        return [m.name for m in self.members.values() if sync_id in m.started()]

    # -- the pool's consumer group --------------------------------------------------------------
    async def wait_group(self, pool: str, members: int, timeout_s: float = 60.0) -> None:
        """Wait until the consumer group of ``pool`` is Stable with ``members`` members (no
        rebalance left to happen)."""
        group = copier_group_id(self.base.kafka.topic_prefix, pool)
        admin = AIOKafkaAdminClient(**client_kwargs(self.base.kafka))
        await admin.start()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self.check()
                (resp,) = await admin.describe_consumer_groups([group])
                g = resp.to_object()["groups"][0]
                found = g.get("members", [])
                if g.get("state") == "Stable" and len(found) == members:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"copier group {group}: {g.get('state')}, "
                                       f"{len(found)} members, wanted {members}")
                await asyncio.sleep(0.5)
        finally:
            await admin.close()

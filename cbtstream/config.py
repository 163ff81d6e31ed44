"""Configuration: environment variables (prefix ``CBTSTREAM_``) over an optional TOML file.

Nested sections use a double underscore, e.g. ``CBTSTREAM_KAFKA__BOOTSTRAP_SERVERS``. The TOML file
is named by ``--config`` or ``CBTSTREAM_CONFIG`` and has one table per section (``[kafka]``,
``[postgres]``...). Environment variables win over the file. Secrets are ``SecretStr`` so they never
appear in ``repr``, logs or error messages; ``*_file`` variants read a secret from a file (for
Docker/Kubernetes secrets).

Only entry points (the CLI, test fixtures) call :func:`load_settings`; everything else receives a
``Settings`` object or one of its sections.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cbtstream.errors import ConfigError
from schemas.events import DEFAULT_POOL, POOL_NAME

#: ``hide_input_in_errors``: a validation error names the setting, never the value it was given
#: (the value may be a secret: a misspelt ``sasl_pasword`` or a whole section's input).
_Frozen = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


def _read_secret_file(path: Path | None) -> SecretStr | None:
    if path is None:
        return None
    try:
        return SecretStr(path.read_text().strip())
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from exc


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster, and how our topics are laid out on it."""

    model_config = _Frozen

    #: Comma-separated ``host:port`` list of the brokers clients bootstrap from.
    bootstrap_servers: str = "127.0.0.1:19092"
    #: How clients talk to the brokers: plain or TLS (``SSL``), with or without a SASL login.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    #: The SASL login mechanism (with ``SASL_PLAINTEXT`` or ``SASL_SSL``); unset: no login.
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    #: The SASL user name.
    sasl_username: str | None = None
    #: The SASL password.
    sasl_password: SecretStr | None = None
    #: A file holding the SASL password; read when ``sasl_password`` is unset.
    sasl_password_file: Path | None = None
    #: CA bundle (PEM) that signed the brokers' certificates; unset: the system trust store.
    ssl_cafile: Path | None = None
    #: Verify the broker's certificate and host name. Only an explicit opt-out turns it off.
    ssl_verify: bool = True
    #: Prepended to every topic and consumer-group name, so several installations (or test runs)
    #: can share a cluster. Empty by default: operators see the documented names.
    topic_prefix: str = ""
    #: Every topic has the same partition count so the Faust table co-partitions with its sources.
    partitions: int = Field(default=4, ge=1, le=1024)
    #: Replication factor of the topics cbtstream creates (``topics create``, the worker's
    #: internal topics): 3 on a production cluster.
    replication_factor: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _password_from_file(self) -> KafkaSettings:
        if self.sasl_password is None and self.sasl_password_file is not None:
            object.__setattr__(self, "sasl_password", _read_secret_file(self.sasl_password_file))
        return self


class PostgresSettings(BaseModel):
    """The audit database."""

    model_config = _Frozen

    #: Host of the PostgreSQL server.
    host: str = "127.0.0.1"
    #: Port of the PostgreSQL server.
    port: int = 15432
    #: The database user.
    user: str = "cbtstream"
    #: The database password (the default suits the local stack only).
    password: SecretStr = SecretStr("cbtstream")
    #: A file holding the password; when set, it wins over ``password``.
    password_file: Path | None = None
    #: The database.
    database: str = "cbtstream"
    #: The schema the audit tables live in (``cbtstream db migrate`` creates them there).
    db_schema: str = "public"

    @model_validator(mode="after")
    def _password_from_file(self) -> PostgresSettings:
        secret = _read_secret_file(self.password_file)
        if secret is not None:
            object.__setattr__(self, "password", secret)
        return self

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect``; contains the password, never log it."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password.get_secret_value(),
            "database": self.database,
        }


class VSphereSettings(BaseModel):
    """The vCenter (or ESXi host) snapshots are taken on and changed areas are read from."""

    model_config = _Frozen

    #: The vSphere SDK endpoint of the vCenter (``https://<vcenter>/sdk``).
    url: str = "https://127.0.0.1:18989/sdk"
    #: The vCenter login.
    username: str = "user"
    #: The vCenter password (the default suits the local simulator only).
    password: SecretStr = SecretStr("pass")
    #: A file holding the password; when set, it wins over ``password``.
    password_file: Path | None = None
    #: Skip TLS certificate verification. Off by default; the local simulator needs it on.
    insecure: bool = False
    #: CA bundle (PEM) that signed the vCenter's certificate; unset: the system trust store.
    cafile: Path | None = None

    @model_validator(mode="after")
    def _password_from_file(self) -> VSphereSettings:
        secret = _read_secret_file(self.password_file)
        if secret is not None:
            object.__setattr__(self, "password", secret)
        return self


class TargetMapping(BaseModel):
    """One operator-chosen replica target: for a disk (by key) or every disk of a VM, a file
    under ``target_root``, a block device matching ``copier.device_allow``, or an NBD export in
    ``copier.nbd_allow``. ``file``, ``device`` and ``nbd`` may use ``{vm}``, ``{device_key}`` and
    ``{disk_id}`` (needed in a per-VM mapping, so each disk gets its own target)."""

    model_config = _Frozen

    #: The disk key (``<vm instance uuid>/disk-<device key>``) this mapping is for.
    disk: str | None = None
    #: A VM instance uuid: the mapping is for every disk of the VM no ``disk`` mapping names.
    vm: str | None = None
    #: A file path relative to ``copier.target_root`` (no ``..``, no absolute path).
    file: str | None = None
    #: A block device path matching ``copier.device_allow`` (opened exclusively).
    device: str | None = None
    #: An NBD URI allowed by ``copier.nbd_allow``.
    nbd: str | None = None

    @model_validator(mode="after")
    def _one_each(self) -> TargetMapping:
        if (self.disk is None) == (self.vm is None):
            raise ValueError("a target mapping names exactly one of 'disk' or 'vm'")
        if sum(x is not None for x in (self.file, self.device, self.nbd)) != 1:
            raise ValueError("a target mapping has exactly one of 'file', 'device' or 'nbd'")
        if self.vm is not None and "{" not in (self.file or self.device or self.nbd or ""):
            raise ValueError("a per-VM target mapping needs {device_key} or {disk_id} in its "
                             "target, or every disk of the VM would share one replica")
        return self


class VddkSettings(BaseModel):
    """How the copier starts ``nbdkit vddk`` per (disk, VM snapshot) (``copier.exports =
    "vddk"``; see ``consumers/vddk/``). Credentials are the ``[vsphere]`` ones: the
    password reaches nbdkit by an inherited pipe (``password=-FD``) or, with ``password_file``,
    as ``password=+FILE`` that nbdkit reads itself; it is never on a command line."""

    model_config = _Frozen

    #: The nbdkit plugin: a name (``vddk``, the real plugin), the path of a plugin ``.so``, or
    #: the path of a Python plugin script (``.py``, run as ``nbdkit python SCRIPT``: the
    #: project's stand-in for tests, ``devstack/nbdkit-vddk/vddk_standin.py``).
    plugin: str = "vddk"
    #: The nbdkit program.
    nbdkit: str = "nbdkit"
    #: Where VDDK is unpacked (``vmware-vix-disklib-distrib``); passed as ``libdir=``.
    libdir: Path | None = None
    #: VDDK's own configuration file (log levels, NFC timeouts); passed as ``config=``.
    config: Path | None = None
    #: ``compression=`` between VDDK and ESXi (vSphere >= 6.5); unset: VDDK's default (none).
    compression: Literal["none", "zlib", "fastlz", "skipz"] | None = None
    #: VDDK transport modes in order of preference; network modes suit a copier outside the
    #: cluster (``hotadd``/``san`` need a proxy VM or SAN access).
    transports: str = "nbdssl:nbd"
    #: ``vcenter``: VDDK logs in to the vCenter of ``vsphere.url``; ``host``: directly to the
    #: VM's ESXi host (its name and ``summary.config.sslThumbprint`` read from vCenter).
    connect: Literal["vcenter", "host"] = "vcenter"
    #: Override the server VDDK connects to (default: the host of ``vsphere.url``).
    server: str | None = None
    #: Override the port (default: the port of ``vsphere.url``; 443 is not passed).
    port: int | None = Field(default=None, ge=1, le=65535)
    #: The server's SHA-1 thumbprint (``AA:BB:...``). Unset: taken from the certificate of a
    #: TLS connection verified like the vSphere client's (never from an unverified one).
    thumbprint: str | None = Field(default=None, pattern=r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){19}$")
    #: VDDK's login (default: ``vsphere.username``).
    user: str | None = None
    #: A file holding VDDK's password, passed to nbdkit as ``password=+FILE`` (it reads the
    #: file itself). Unset: ``vsphere.password`` through a pipe (``password=-FD``).
    password_file: Path | None = None
    #: Private folder (0700) of the unix sockets, pidfiles and logs of the running nbdkits
    #: (default: ``<copier.state_dir>/vddk``). ``copier.nbd_allow`` must allow
    #: ``unix:<run_dir>/``. Unix socket paths are limited to 107 bytes: keep it short.
    run_dir: Path | None = None
    #: Seconds nbdkit may take to write its pidfile and answer the probe connection.
    start_timeout_s: float = Field(default=60.0, gt=0)


# The pool every disk is in unless ``[pools]`` says otherwise (DEFAULT_POOL); its copiers keep
# the consumer group of the copiers that predate pools (``<prefix>cbtstream-copier``).


class PoolAssignment(BaseModel):
    """One line of ``[[pools.assign]]``: the pool that holds a disk's replica (by disk key) or
    the replicas of every disk of a VM (by instance uuid)."""

    model_config = _Frozen

    #: The disk key (``<vm instance uuid>/disk-<device key>``).
    disk: str | None = None
    #: A VM instance uuid: every disk of the VM no ``disk`` line names.
    vm: str | None = None
    #: The pool (``copier.pool`` of the copiers that serve it).
    pool: str = Field(pattern=POOL_NAME)

    @model_validator(mode="after")
    def _one(self) -> PoolAssignment:
        if (self.disk is None) == (self.vm is None):
            raise ValueError("a pool assignment names exactly one of 'disk' or 'vm'")
        return self


class PoolsSettings(BaseModel):
    """Which copier pool holds each disk's replica (read by the planner, which routes each plan
    to its disk's pool). A disk keeps the pool of its first plan: a later change here is
    reported (``cbtstream pools``, ``cbtstream_disks_pool_mismatch``), never followed silently;
    ``cbtstream pools move`` moves a disk, at the cost of a full copy."""

    model_config = _Frozen

    #: The pool of disks no assignment names.
    default: str = Field(default=DEFAULT_POOL, pattern=POOL_NAME)
    #: ``[[pools.assign]]`` lines (JSON in ``CBTSTREAM_POOLS__ASSIGN``); a per-disk line wins
    #: over a per-VM one.
    assign: tuple[PoolAssignment, ...] = ()

    def pool_for(self, disk_key: str) -> str:
        """The configured pool of ``disk_key`` (pure)."""
        vm = disk_key.split("/", 1)[0].lower()
        by_vm = None
        for a in self.assign:
            if a.disk == disk_key:
                return a.pool
            if by_vm is None and a.vm is not None and a.vm.lower() == vm:
                by_vm = a.pool
        return by_vm if by_vm is not None else self.default


class CopierSettings(BaseModel):
    """Where replicas may be written and which NBD sources may be read."""

    model_config = _Frozen

    #: Replicas are files (or block-device symlinks) under this directory, one per disk, named by
    #: the disk key. Nothing outside it is ever opened for writing.
    target_root: Path = Path(".stack/replicas")
    #: Operator-chosen targets (``[[copier.targets]]`` tables, or JSON in
    #: ``CBTSTREAM_COPIER__TARGETS``); disks not mapped get ``<target_root>/<vm>/disk-<n>.img``.
    targets: tuple[TargetMapping, ...] = ()
    #: Globs of block device paths a mapping may name (e.g. ``/dev/disk/by-id/*``); empty: none.
    device_allow: tuple[str, ...] = ()
    #: ``host:port`` pairs of NBD servers the copier may read from. Events never name endpoints
    #: the copier is not configured for.
    nbd_allow: tuple[str, ...] = ("127.0.0.1",)
    #: Largest single read/write request.
    request_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)
    #: Requests in flight per disk copy (across its connections). With a latency-bound source
    #: (VDDK over NFC: about a millisecond per request) throughput is about
    #: ``max_in_flight * request_bytes / latency``, so 8 x 4 MiB keeps a 1 Gbit/s link busy at
    #: up to ~250 ms of latency while bounding memory to 32 MiB per disk.
    max_in_flight: int = Field(default=8, ge=1, le=256)
    #: Bytes of read buffers every copy of the copier shares, in use and kept for reuse
    #: (``consumers/copy/buffers.py``): a request that would pass it waits for buffers to come
    #: back. The default is above ``max_parallel_disks * max_in_flight * request_bytes`` (128
    #: MiB), so it only bounds a copier tuned for many more copies at once; reuse makes small
    #: disks cost no fresh allocation each.
    buffer_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    #: Changed extents closer than this are read as one range (the gap is read too). Below one
    #: 64 KiB CBT block, so two changed blocks are never joined: measured (``bench copy
    #: --gaps``), joining them saved nothing with requests in flight and cost time once the
    #: link was the limit (1 MiB, DOMAIN.md's hint, read 2.15x the changed bytes of scattered
    #: 64 KiB changes); 32 KiB is where one more request costs about what reading the gap does
    #: (1 Gbit/s, 2 ms, 8 requests in flight), and it still joins fragments of a block.
    merge_gap_bytes: int = Field(default=32 * 1024, ge=0)
    #: How many disks are copied at once (plans of different disks run concurrently even when
    #: they share a partition; the plans of one disk run one after another).
    max_parallel_disks: int = Field(default=4, ge=1)
    #: Plans a copier holds per partition before it stops fetching from it (it resumes at half
    #: of it). Held plans are reported as queued; plans still in Kafka are not, so keep this
    #: above the number of disks of a partition that may have a sync pending at once.
    max_waiting_per_partition: int = Field(default=1000, ge=1)
    #: Seconds between SyncProgress events per disk.
    progress_interval_s: float = Field(default=2.0, gt=0)
    #: Seconds between two ``SyncProgress(state="queued")`` of a plan the copier holds but has
    #: not started (at most a fifth of ``streams.sync_timeout_s``, so waiting is not silence).
    queue_report_interval_s: float = Field(default=60.0, gt=0)
    #: The copier's own state (must survive restarts; small files): the ledger of published
    #: outcomes and, unless ``records_dir`` is set, the records of block-device and NBD
    #: replicas. Resume checkpoints are kept with each replica's record.
    state_dir: Path = Path(".stack/copier")
    #: Parallel NBD connections per source disk.
    nbd_connections: int = Field(default=2, ge=1, le=16)
    #: Where snapshot disks are exported over NBD: "vddk" starts ``nbdkit vddk`` per disk and
    #: snapshot (production; see ``copier.vddk``); "simulator" asks the vcsim-cbt side channel
    #: (development). Both are ``consumers.exports.ExportResolver``.
    exports: Literal["simulator", "vddk"] = "simulator"
    vddk: VddkSettings = VddkSettings()
    #: Save a resume checkpoint after at least this many bytes (each save flushes the target).
    checkpoint_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    #: Read rate limit per disk copy in bytes/s, to spare a WAN link or a busy datastore
    #: (0: unlimited).
    max_bytes_per_s: int = Field(default=0, ge=0)
    #: Re-read every sync's written ranges from the target and compare digests (slower).
    verify: bool = False
    #: Seconds between two background re-hashes of this copier's replicas (one replica per
    #: check, the least recently verified first); 0 turns the patrol off.
    verify_interval_s: float = Field(default=0.0, ge=0)
    #: Read rate of the patrol, so verification never competes with syncs for the disks.
    verify_max_bytes_per_s: int = Field(default=50 * 1024 * 1024, ge=0)
    #: Talk TLS to NBD servers even for ``nbd://`` URIs (``nbds://`` always does). The server's
    #: certificate is verified against ``nbd_cafile`` (or the system trust store).
    nbd_tls: bool = False
    #: CA bundle (PEM) for the NBD servers' certificates; unset: the system trust store.
    nbd_cafile: Path | None = None
    #: Verify the NBD server's certificate and host name. Only an explicit opt-out turns it off.
    nbd_tls_verify: bool = True
    #: Port of the copier's Prometheus ``/metrics`` endpoint on ``metrics_host``: on by default
    #: (loopback), so a copier is always scrapeable by a local agent; 0 turns it off. Two
    #: copiers on one host need a port each (a copier refuses to start on a port in use).
    metrics_port: int = Field(default=9466, ge=0, le=65535)
    #: Address the copier's ``/metrics`` endpoint binds.
    metrics_host: str = "127.0.0.1"
    #: The pool this copier serves: it runs only the plans of disks in this pool
    #: (``[pools]``), in the consumer group of the pool (every member of a pool shares it).
    pool: str = Field(default=DEFAULT_POOL, pattern=POOL_NAME)
    #: This copier's host name as written in the replica records it writes (default: the
    #: machine's host name). Two copiers on one machine that stand for two hosts need their own.
    host: str = Field(default="", max_length=253)
    #: What the pool's replica storage is. ``host-local``: only this host sees it (a local file
    #: system, local disks); a replica record written by another host is refused (``replica_
    #: on_other_host``, naming both hosts), never silently recopied, so such a pool has one
    #: member per storage. ``shared``: every member sees the same replicas and records (an NFS
    #: export as ``target_root`` and ``records_dir``, NBD targets, SAN volumes), so any member
    #: may run any disk and a host change costs no copy.
    storage: Literal["host-local", "shared"] = "host-local"
    #: Where the records (and resume checkpoints) of block-device and NBD replicas are kept
    #: (file replicas keep theirs beside the file). Default ``<state_dir>/targets``: host-local;
    #: a ``shared`` pool with such targets needs it on storage every member sees.
    records_dir: Path | None = None
    #: Copies this copier runs at once from the VMs of one ESXi host (0: no limit). Each copy
    #: holds ``nbd_connections`` NFC connections on that host; VMware's VDDK guide gives an
    #: ESXi host 48 MB of NFC buffers (48 concurrent 1 MB streams, vSphere 6.x-8) and vCenter
    #: 52 connections, so 8 copies x 2 connections leaves most of it to other tools.
    #: Fleet-wide the figure is this times the copiers of the pool.
    max_copies_per_esxi_host: int = Field(default=8, ge=0)
    #: Copies this copier runs at once from the disks of one datastore (0: no limit), so one
    #: datastore's VMs do not all pay for a seeding at once.
    max_copies_per_datastore: int = Field(default=8, ge=0)

    @property
    def host_name(self) -> str:
        """``host``, or the machine's host name."""
        return self.host or socket.gethostname()

    @property
    def record_dir(self) -> Path:
        """Where block-device and NBD replica records live (``records_dir`` or the default)."""
        return self.records_dir if self.records_dir is not None else self.state_dir / "targets"


class StreamsSettings(BaseModel):
    """The Faust planner application."""

    model_config = _Frozen

    #: The Faust application id: the planner's consumer group and the prefix of its table
    #: changelogs and internal topics (after ``kafka.topic_prefix``).
    app_id: str = "cbtstream"
    #: Address the worker's web server (the HTTP API, ``/metrics``) binds. Anything but a
    #: loopback address (127.0.0.0/8, ``::1``, ``localhost``) needs ``api.token``.
    web_host: str = "127.0.0.1"
    #: Port of the worker's web server.
    web_port: int = 6066
    #: Faust's data folder (one folder per app id inside).
    data_dir: Path = Path(".stack/faust")
    #: Remove a VM snapshot in vSphere once every disk in it is synced (needs ``[vsphere]``).
    remove_snapshots: bool = True
    #: Snapshot removals running at once per worker (vCenter tasks; ESXi merges each delta).
    #: The lifecycle stream never waits for one (streams/removals.py).
    remove_concurrency: int = Field(default=8, ge=1, le=64)
    #: Every so many seconds the worker retries the removals of its snapshots that are
    #: releasable but still on their VMs (failed, or left by a worker killed or rebalanced).
    remove_sweep_interval_s: float = Field(default=60.0, gt=0)
    #: Disk keys or VM instance uuids copied by an external copier (the seed's migratekit) that
    #: stores its change IDs through the API: cbtstream records their snapshots but never plans
    #: them (streams.external). Disks with external commits are treated the same.
    external: tuple[str, ...] = ()
    #: Disk keys or VM instance uuids handed to cbtstream's own copier: planned by cbtstream
    #: even after external commits, and refusing further external commits.
    handover: tuple[str, ...] = ()
    #: Every so many seconds the worker removes orphaned cbtstream snapshots (producers/
    #: orphans.py); 0 (default): only ``cbtstream snapshots prune`` does.
    orphan_interval_s: float = Field(default=0.0, ge=0)
    #: An orphan must be at least this old (a fresh snapshot may not have reached the planner).
    orphan_older_than_s: float = Field(default=6 * 3600.0, gt=0)
    #: Also consolidate the disks of VMs whose runtime.consolidationNeeded is set.
    orphan_consolidate: bool = False
    #: A running sync with no outcome and no ``SyncProgress`` for this long is re-issued (its
    #: plan again, same sync id), and after as long again ended as ``SyncFailed(sync_timed_out)``
    #: so the disk's waiting snapshot starts. Longer than any silence of a healthy copier (it
    #: reports progress every ``copier.progress_interval_s``, and a plan it holds queued every
    #: ``copier.queue_report_interval_s``); 0 turns the check off.
    sync_timeout_s: float = Field(default=1800.0, ge=0)
    #: How often the worker looks for silent syncs.
    sync_check_interval_s: float = Field(default=30.0, gt=0)
    #: Kafka group session timeout: a killed worker's partitions move to the others after this.
    #: Heartbeats run in Faust's consumer thread (not blocked by a busy event loop), so a short
    #: timeout does not evict a healthy worker; brokers accept 6 s and more by default.
    session_timeout_s: float = Field(default=10.0, ge=6)
    #: Seconds between two Kafka group heartbeats (well below ``session_timeout_s``).
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    #: Static group membership (aiokafka ``group_instance_id``): a worker restarted with the same
    #: id within ``session_timeout_s`` takes its partitions back without a rebalance. Must be
    #: unique per worker process; unset (dynamic membership) by default.
    group_instance_id: str | None = None
    #: SIGTERM: a worker that has not stopped cleanly after this long (offsets committed,
    #: producer flushed) exits anyway, before an orchestrator's SIGKILL would.
    shutdown_timeout_s: float = Field(default=8.0, gt=0)
    #: Recovery point objective, for ``cbtstream status`` and ``GET /api/v1/status``: a disk
    #: whose replica holds data older than this (the snapshot time of its latest commit) has
    #: *missed* it; one older than ``rpo_at_risk`` of it is *at risk*.
    rpo_s: float = Field(default=86400.0, gt=0)
    #: Share of ``rpo_s`` after which a disk's recovery point is reported at risk.
    rpo_at_risk: float = Field(default=0.75, gt=0, le=1)


#: Shortest API token accepted.
MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """Whether a bind address only reaches this machine: ``localhost``, 127.0.0.0/8 or ``::1``
    (an empty host or ``0.0.0.0`` binds every interface; any other name may resolve anywhere)."""
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class ApiSettings(BaseModel):
    """The seed-compatible HTTP API. It is served by the planner worker's web server, so its
    address is ``streams.web_host``/``streams.web_port``."""

    model_config = _Frozen

    #: Required as ``Authorization: Bearer <token>`` by every change-ID endpoint of the HTTP
    #: API, reads and writes (401 without it). Unset: the read endpoints are open to anyone who
    #: can connect (only allowed with a loopback ``streams.web_host``) and the write endpoints
    #: refuse every call (403). At least 16 characters; e.g. ``openssl rand -hex 32``.
    token: SecretStr | None = None
    #: A file holding the token (Docker/Kubernetes secrets); used when ``token`` is unset.
    token_file: Path | None = None

    @model_validator(mode="after")
    def _token_from_file(self) -> ApiSettings:
        if self.token is None and self.token_file is not None:
            object.__setattr__(self, "token", _read_secret_file(self.token_file))
        if self.token is not None and len(self.token.get_secret_value()) < MIN_TOKEN_LENGTH:
            # an empty or short token is a guessable password ("Bearer " would match "")
            raise ValueError(f"api.token must be at least {MIN_TOKEN_LENGTH} characters "
                             "(e.g. `openssl rand -hex 32`)")
        return self


class StackSettings(BaseModel):
    """The local development stack started by ``cbtstream stack up``."""

    model_config = _Frozen

    #: Every file the stack writes (data, logs, pids, downloaded jars) lives under this folder.
    dir: Path = Path(".stack")
    #: Address every service of the stack listens on.
    host: str = "127.0.0.1"
    #: Kafka's ``PLAINTEXT`` listener.
    kafka_port: int = 19092
    #: Kafka's KRaft controller listener.
    kafka_controller_port: int = 19093
    #: A second Kafka listener, ``SASL_SSL`` with SCRAM-SHA-512 and a certificate from the
    #: stack's own CA (``<dir>/kafka/tls``), to test secured clients (0: no such listener).
    kafka_sasl_port: int = 19094
    #: The SCRAM user of that listener (its password: ``<dir>/kafka/sasl/password``).
    kafka_sasl_username: str = "cbtstream"
    #: PostgreSQL's port.
    postgres_port: int = 15432
    #: The vSphere simulator's port (SDK at ``/sdk``, its side channel at ``/cbt``).
    vcsim_port: int = 18989


_WINDOW = r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$"


class SchedulePolicy(BaseModel):
    """One ``[[schedule.policies]]`` table: which VMs (the union of its selectors, evaluated
    against the inventory every cycle), how often they are snapshotted and their RPO."""

    model_config = _Frozen

    #: The policy's name, in events, metrics and messages.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    #: Recovery point objective in seconds: a VM whose replica is provably older than this has
    #: missed it (``RpoMissed``).
    rpo_s: float = Field(gt=0)
    #: Seconds between two snapshots of a VM (slots on a grid from the Unix epoch). Default
    #: half the RPO: a snapshot then has the other half to be copied before the RPO is missed.
    every_s: float | None = Field(default=None, gt=0)
    #: ``HH:MM-HH:MM`` (UTC; may wrap midnight): snapshots start only inside it, and the RPO
    #: is judged only inside it. Unset: always.
    window: str | None = Field(default=None, pattern=_WINDOW)
    #: Inventory paths of VM folders (``/DC/vm/prod``); VMs in subfolders are included.
    folders: tuple[str, ...] = ()
    #: Names of clusters (``ClusterComputeResource``) whose VMs are included.
    clusters: tuple[str, ...] = ()
    #: vSphere tags, ``category/tag`` or ``tag`` (read through the vAPI REST endpoint).
    tags: tuple[str, ...] = ()
    #: Shell patterns on VM names (``web-*``); a pattern may match no VM yet.
    names: tuple[str, ...] = ()
    #: VMs by instance uuid or inventory path; each must exist.
    vms: tuple[str, ...] = ()
    #: Turn CBT on where it is off (reconfigure + stun snapshot) instead of failing the VM.
    enable_cbt: bool = False
    #: Quiesce the guest file systems.
    quiesce: bool = False

    @model_validator(mode="after")
    def _check(self) -> SchedulePolicy:
        if not (self.folders or self.clusters or self.tags or self.names or self.vms):
            raise ValueError(f"schedule policy {self.name!r} selects no VM: give folders, "
                             "clusters, tags, names or vms")
        if self.every_s is not None and self.every_s > self.rpo_s:
            raise ValueError(f"schedule policy {self.name!r}: every_s ({self.every_s:g}) is "
                             f"longer than rpo_s ({self.rpo_s:g}): the RPO would be missed "
                             "every cycle")
        return self

    @property
    def interval_s(self) -> float:
        """Seconds between two snapshots of a VM (``every_s`` or half the RPO)."""
        return self.every_s if self.every_s is not None else self.rpo_s / 2


class ScheduleSettings(BaseModel):
    """The site scheduler (``cbtstream schedule``): protection policies evaluated against the
    vCenter inventory every cycle, snapshots taken concurrently within bounds."""

    model_config = _Frozen

    #: ``[[schedule.policies]]`` tables (JSON in ``CBTSTREAM_SCHEDULE__POLICIES``).
    policies: tuple[SchedulePolicy, ...] = ()
    #: Seconds between two evaluations of the inventory (a cycle: new VMs are picked up, due
    #: VMs snapshotted, RPOs judged). Shorter than every policy's interval.
    tick_s: float = Field(default=30.0, gt=0)
    #: Snapshots in progress at once on the vCenter. Each is a task in vCenter's queue and a
    #: stun of its VM; a few dozen keep a vCenter responsive for operators and other tools.
    max_snapshots_per_vcenter: int = Field(default=16, ge=1)
    #: Snapshots in progress at once on one ESXi host: each stuns a VM and writes a delta file
    #: on its datastore; a few per host spare hostd and the storage a burst of stuns.
    max_snapshots_per_esxi_host: int = Field(default=4, ge=1)
    #: Port of the scheduler's Prometheus ``/metrics`` endpoint on ``metrics_host`` (0: off).
    metrics_port: int = Field(default=9467, ge=0, le=65535)
    #: Address the scheduler's ``/metrics`` endpoint binds.
    metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _unique_names(self) -> ScheduleSettings:
        names = [p.name for p in self.policies]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"schedule policies named twice: {', '.join(twice)}")
        return self


class PointsPolicy(BaseModel):
    """``[points]``: which restore points of each disk the copier keeps (the rules:
    ``consumers/points/retention.py``). The defaults keep only the live replica, which costs
    nothing: no old bytes are read or saved before a sync's writes."""

    model_config = _Frozen

    #: The newest points kept, the live replica included (1: no history, no undo cost).
    count: int = Field(default=1, ge=1, le=10_000)
    #: Points committed longer ago are dropped whatever else keeps them (the live point never
    #: is). An ISO 8601 duration (``P30D``, ``PT12H``); unset: no age limit.
    max_age: timedelta | None = Field(default=None, gt=timedelta(0))
    #: Also keep the newest point of each of the latest ``daily`` UTC days that have one.
    daily: int = Field(default=0, ge=0, le=10_000)
    #: Also keep the newest point of each of the latest ``weekly`` ISO weeks that have one.
    weekly: int = Field(default=0, ge=0, le=10_000)

    @property
    def keeps_history(self) -> bool:
        """Does any point besides the live one survive? If not, a sync saves no undo bytes."""
        return self.count > 1 or self.daily > 0 or self.weekly > 0


class Settings(BaseSettings):
    """All of cbtstream's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="CBTSTREAM_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        hide_input_in_errors=True,  # the input holds every secret of the environment
    )

    #: Level of cbtstream's own logs (``-v`` on the command line: DEBUG).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Log lines as JSON objects, or for a person at a console (also ``--log-format``).
    log_format: Literal["json", "console"] = "json"
    #: Level of third-party libraries' logs (Kafka clients, Faust): INFO shows rebalances and
    #: table recovery, which helps when a worker seems idle.
    library_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    kafka: KafkaSettings = KafkaSettings()
    postgres: PostgresSettings = PostgresSettings()
    vsphere: VSphereSettings = VSphereSettings()
    copier: CopierSettings = CopierSettings()
    pools: PoolsSettings = PoolsSettings()
    streams: StreamsSettings = StreamsSettings()
    api: ApiSettings = ApiSettings()
    stack: StackSettings = StackSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    points: PointsPolicy = PointsPolicy()

    @model_validator(mode="after")
    def _token_off_loopback(self) -> Settings:
        """A worker reachable from other machines must not serve the API without a token:
        anyone could read every disk's change ID, and the write endpoints would be open."""
        host = self.streams.web_host
        if self.api.token is None and not is_loopback(host):
            raise ValueError(
                f"streams.web_host {host!r} is not a loopback address (127.0.0.0/8, ::1, "
                "localhost), so the worker's HTTP API would be reachable from other machines; "
                "set an API token: CBTSTREAM_API__TOKEN=$(openssl rand -hex 32), or token / "
                "token_file in the [api] table of the config file (or bind streams.web_host "
                "to 127.0.0.1)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("CBTSTREAM_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from the environment, an optional TOML file and explicit overrides."""
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        os.environ["CBTSTREAM_CONFIG"] = str(config_file)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False, include_input=False))
        raise ConfigError(f"invalid configuration: {problems}") from exc
    except ValueError as exc:  # e.g. a TOML syntax error
        raise ConfigError(f"invalid configuration: {exc}") from exc


def to_env(settings: Settings) -> dict[str, str]:
    """``CBTSTREAM_*`` variables that reproduce ``settings`` in a child process (secrets
    included: pass them only to processes of ours, never print them)."""
    import json

    env: dict[str, str] = {
        "CBTSTREAM_LOG_LEVEL": settings.log_level,
        "CBTSTREAM_LOG_FORMAT": settings.log_format,
        "CBTSTREAM_LIBRARY_LOG_LEVEL": settings.library_log_level,
    }
    for section in type(settings).model_fields:
        model = getattr(settings, section)
        if not isinstance(model, BaseModel):
            continue
        for field in type(model).model_fields:
            value = getattr(model, field)
            if value is None:
                continue
            if isinstance(value, BaseModel):  # a nested section (copier.vddk): JSON
                value = value.model_dump_json(exclude_none=True)
            elif isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, timedelta):  # str() gives "1 day, 0:00:00": not parsed back
                value = f"PT{value.total_seconds()}S"
            if isinstance(value, list | tuple):
                value = json.dumps([v.model_dump(mode="json", exclude_none=True)
                                    if isinstance(v, BaseModel) else str(v) for v in value])
            env[f"CBTSTREAM_{section.upper()}__{field.upper()}"] = str(value)
    return env

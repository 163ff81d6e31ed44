"""The audit trail: every pipeline event, idempotently, in PostgreSQL.

Modules: ``consumer`` reads every topic of ``schemas.topics.AUDITED_TOPICS`` (group
``<prefix>cbtstream-audit``), ``decoding`` says which event a record carries (pure),
``projection`` turns events into SQL (pure), ``repository`` is the only module that imports
asyncpg (writes, migrations, read API, ``rebuild``), ``migrations`` lists the versioned
``migrations/NNNN_*.sql`` files that ``cbtstream db migrate`` (and ``cbtstream audit`` at start)
applies.

Tables (all in ``postgres.db_schema``):

* ``events``: the raw log, one row per event id (``"offset"`` and ``"partition"`` are quoted
  identifiers). ``SyncProgress`` is not logged; the newest per sync is on its job. Control
  events (fences, the scheduler's events, the VM descriptions) have a null ``disk_key``.
* ``replication_jobs``: the seed's table, **one row per sync** (``id`` = ``sync_id``, so one disk
  per job). ``replication_type`` uses the seed's vocabulary: ``initial`` = a full copy of a disk
  that never committed (reason ``no_previous_commit``), ``incremental``, and ``full`` = a full
  copy for any other reason (CBT reset, resized disk, rejected base change ID...; see ``reason``).
  It is the committed commit's type if there is one (a copier fallback shows), else the plan's.
  ``status``: ``planned`` (queued in a copier included) -> ``running`` (progress of the copy
  seen) -> ``completed`` (a commit not refused) or
  ``failed`` (a ``SyncFailed``, including a refused commit: ``failure_reason``).
* ``vm_disks``: the seed's table, one row per (job, disk); ``disk_id`` is ``disk-<device key>``,
  ``disk_change_id`` is the committed change ID, null until committed and for refused commits.
  ``updated_at`` is the time of the newest event of that sync (event time, not ingestion time).
* ``cbt_history``: one row per ``ChangeIdCommitted`` (the lineage of each disk), ``refused`` set
  when the planner's guard answered it with ``SyncFailed(lineage_mismatch)``.
* ``schedule_events``: one row per ``ScheduleEvent`` of ``cbt.schedule.events`` (snapshot taken
  or failed, ``rpo_at_risk``, ``rpo_missed``), by VM, policy and cycle.
* ``fence_events``: one row per ``ChangeIdFence`` record of ``cbt.changeid.fences`` (issued,
  published again, revoked); the newest row of a ``fence_id`` is the fence in force. Tombstones
  are not stored.
* ``vm_descriptions``: one row per ``VmDescribed`` of ``cbt.vm.described`` (a VM's description
  at one of its snapshots: firmware, CPUs, memory, guest id, counts of disks and NICs, and the
  whole ``VmDescription`` as jsonb); a VM's newest row by ``taken_at`` is what a failover needs.

Every projection column is derived from event contents only, in an order-independent way, so a
rebuild from the Kafka log equals the live tables (see ``projection``).
"""

-- Version 4: the control topics are audited too (schemas.topics.AUDITED_TOPICS). Their events are
-- in the raw log `events` like any other (disk_key and sync_id null: they are not about a disk;
-- vm_instance_uuid set for a ScheduleEvent, null for a fence), and each has a projection table,
-- one row per event, inserted in the transaction that inserts its `events` row
-- (ON CONFLICT (event_id) DO NOTHING: a redelivered record changes nothing).

-- cbt.schedule.events: what the site scheduler did or found for one VM in one cycle
-- (snapshot_taken, snapshot_failed, rpo_at_risk, rpo_missed).
CREATE TABLE schedule_events (
    event_id         uuid PRIMARY KEY,
    occurred_at      timestamptz NOT NULL,
    vm_instance_uuid uuid        NOT NULL,
    vm_name          text        NOT NULL,
    vm_path          text        NOT NULL,
    vcenter          text        NOT NULL,
    policy           text        NOT NULL,
    kind             text        NOT NULL,
    cycle_at         timestamptz NOT NULL,  -- start of the schedule slot
    rpo_s            double precision NOT NULL,
    vm_snapshot      text,
    point_at         timestamptz,           -- rpo_*: the replica holds nothing newer than this
    reason           text,                  -- snapshot_failed: the error's reason code
    detail           text        NOT NULL
);
CREATE INDEX schedule_events_vm_idx ON schedule_events (vm_instance_uuid, occurred_at);
CREATE INDEX schedule_events_kind_idx ON schedule_events (kind, occurred_at);

-- cbt.changeid.fences: every fence record, issued or revoked (a revoke is a new record of the
-- same fence_id with revoked = true). The fence in force is the newest record of its fence_id.
-- Tombstones (null values) are not events and are not stored.
CREATE TABLE fence_events (
    event_id    uuid PRIMARY KEY,
    occurred_at timestamptz NOT NULL,
    fence_id    uuid        NOT NULL,
    scope       text        NOT NULL,  -- vm | host | vcenter | all
    target      text,                  -- null for scope all
    fenced_before timestamptz NOT NULL,  -- change IDs of snapshots taken before are untrusted
    reason      text        NOT NULL,
    revoked     boolean     NOT NULL
);
CREATE INDEX fence_events_fence_idx ON fence_events (fence_id, occurred_at);

-- cbtstream audit trail, version 1: the raw event log and the seed-compatible projections.
-- Tables are created in the schema first on the connection's search_path (settings.postgres.db_schema).
-- Every projection column is derived from events only (no now()), so a rebuild from the Kafka log
-- yields the same rows as the live consumer, whatever order the topics were read in.

-- The raw log: one row per event id (SyncProgress is not stored here: see replication_jobs.progress_*).
CREATE TABLE events (
    event_id         uuid PRIMARY KEY,
    event_type       text        NOT NULL,
    disk_key         text,
    vm_instance_uuid uuid,
    sync_id          uuid,
    vm_snapshot      text,
    topic            text        NOT NULL,
    "partition"      integer     NOT NULL,
    "offset"         bigint      NOT NULL,
    occurred_at      timestamptz NOT NULL,
    body             jsonb       NOT NULL,
    ingested_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_disk_key_idx ON events (disk_key, occurred_at);
CREATE INDEX events_sync_id_idx ON events (sync_id) WHERE sync_id IS NOT NULL;
CREATE INDEX events_type_idx ON events (event_type, occurred_at);

-- One row per sync (SyncPlanned.sync_id): the seed's replication_jobs, one disk per job.
CREATE TABLE replication_jobs (
    id                       uuid PRIMARY KEY,
    source_vm_path           text,
    source_vm_name           text,
    vm_instance_uuid         uuid        NOT NULL,
    disk_key                 text        NOT NULL,
    disk_id                  text        NOT NULL,
    vm_snapshot              text,
    snapshot_event_id        uuid,
    planned                  boolean     NOT NULL DEFAULT false,
    planned_type             text,        -- SyncPlanned.replication_type: full | incremental
    planned_reason           text,
    committed_type           text,        -- of the accepted (not refused) commit, if any
    committed_reason         text,
    committed_at             timestamptz,
    failed_at                timestamptz,
    failure_reason           text,
    failure_detail           text,
    progress_at              timestamptz,
    progress_bytes_done      bigint,
    progress_bytes_total     bigint,
    progress_rate_bytes_per_s double precision,
    created_at               timestamptz NOT NULL,
    updated_at               timestamptz NOT NULL,
    -- The seed's vocabulary: 'initial' (full copy of a disk that never committed), 'incremental',
    -- or 'full' (a full copy for another reason, e.g. a CBT reset: see reason).
    replication_type text GENERATED ALWAYS AS (
        CASE
            WHEN coalesce(committed_type, planned_type) = 'incremental' THEN 'incremental'
            WHEN coalesce(committed_type, planned_type) IS NULL THEN NULL
            WHEN coalesce(committed_reason, planned_reason) = 'no_previous_commit' THEN 'initial'
            ELSE 'full'
        END) STORED,
    reason text GENERATED ALWAYS AS (coalesce(committed_reason, planned_reason)) STORED,
    status text GENERATED ALWAYS AS (
        CASE
            WHEN committed_at IS NOT NULL THEN 'completed'
            WHEN failed_at IS NOT NULL THEN 'failed'
            WHEN progress_at IS NOT NULL THEN 'running'
            ELSE 'planned'
        END) STORED
);
CREATE INDEX replication_jobs_vm_path_idx ON replication_jobs (source_vm_path);
CREATE INDEX replication_jobs_vm_name_idx ON replication_jobs (source_vm_name, created_at);
CREATE INDEX replication_jobs_disk_key_idx ON replication_jobs (disk_key, created_at);

-- One row per (job, disk): the seed's vm_disks. disk_change_id is set only by an accepted commit.
CREATE TABLE vm_disks (
    job_id             uuid        NOT NULL REFERENCES replication_jobs (id),
    disk_id            text        NOT NULL,
    disk_key           text        NOT NULL,
    vm_instance_uuid   uuid        NOT NULL,
    device_key         integer     NOT NULL,
    vm_snapshot        text,
    planned_change_id  text,        -- the snapshot's change ID the sync will commit
    base_change_id     text,        -- where changed areas are queried from (null: full)
    previous_change_id text,        -- the disk's committed change ID when planned
    disk_change_id     text,        -- the committed change ID (null until committed, or refused)
    commit_event_id    uuid,
    bytes_copied       bigint,
    bytes_zeroed       bigint,
    extents            bigint,
    digest             text,
    duration_s         double precision,
    capacity_bytes     bigint,
    backing_uuid       text,
    backing_file       text,
    snapshot_removed_at timestamptz,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    PRIMARY KEY (job_id, disk_id)
);
CREATE INDEX vm_disks_disk_key_idx ON vm_disks (disk_key, updated_at);
CREATE INDEX vm_disks_snapshot_idx ON vm_disks (disk_key, vm_snapshot);

-- Lineage: one row per ChangeIdCommitted event. refused: the planner's commit guard refused it
-- (a SyncFailed lineage_mismatch whose event id is derived from this commit's event id).
CREATE TABLE cbt_history (
    event_id           uuid PRIMARY KEY,
    disk_key           text        NOT NULL,
    vm_instance_uuid   uuid        NOT NULL,
    disk_id            text        NOT NULL,
    previous_change_id text,
    change_id          text        NOT NULL,
    replication_type   text        NOT NULL,
    reason             text        NOT NULL,
    bytes_copied       bigint      NOT NULL,
    bytes_zeroed       bigint      NOT NULL,
    extents            bigint      NOT NULL,
    digest             text        NOT NULL,
    duration_s         double precision NOT NULL,
    committed_at       timestamptz NOT NULL,
    sync_id            uuid        NOT NULL,
    vm_snapshot        text        NOT NULL,
    refusal_event_id   uuid        NOT NULL UNIQUE,
    refused            boolean     NOT NULL DEFAULT false
);
CREATE INDEX cbt_history_disk_idx ON cbt_history (disk_key, committed_at);
CREATE INDEX cbt_history_sync_idx ON cbt_history (sync_id);

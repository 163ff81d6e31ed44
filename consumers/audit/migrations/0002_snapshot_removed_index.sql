-- Version 2: find a disk snapshot's SnapshotRemoved event by (disk key, snapshot) without scanning
-- every SnapshotRemoved (vm_disks upserts look it up; prepared statements use generic plans).
CREATE INDEX events_snapshot_removed_idx ON events (disk_key, vm_snapshot)
    WHERE event_type = 'SnapshotRemoved';

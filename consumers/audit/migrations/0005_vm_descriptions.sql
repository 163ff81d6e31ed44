-- Version 5: cbt.vm.described (schemas.topics.VM_DESCRIBED) is audited too. A VmDescribed is the
-- VM's description (schemas.vm.VmDescription) read right after one of its snapshots; its
-- `events` row has no disk key (vm_instance_uuid and vm_snapshot set), and it is one row of
-- vm_descriptions, inserted in the transaction that inserts its `events` row and never updated.
-- Its event id is derived from (vCenter, VM, VM snapshot), so this is one row per VM snapshot
-- however often the description was published.

CREATE TABLE vm_descriptions (
    event_id         uuid PRIMARY KEY,
    occurred_at      timestamptz NOT NULL,  -- when the description was read
    vm_instance_uuid uuid        NOT NULL,
    vm_name          text        NOT NULL,
    vm_path          text        NOT NULL,
    vcenter          text        NOT NULL,
    vm_snapshot      text        NOT NULL,
    snapshot_name    text        NOT NULL,
    taken_at         timestamptz NOT NULL,  -- the snapshot's creation time
    firmware         text        NOT NULL,  -- bios | efi
    secure_boot      boolean     NOT NULL,
    num_cpus         integer     NOT NULL,
    cores_per_socket integer     NOT NULL,
    memory_mib       bigint      NOT NULL,
    guest_id         text        NOT NULL,
    hardware_version text        NOT NULL,
    disks            integer     NOT NULL,  -- how many disks the description lists
    nics             integer     NOT NULL,
    description      jsonb       NOT NULL   -- the VmDescription whole (disks in controller order)
);
-- The newest description of a VM (what a failover reads) and a VM's history.
CREATE INDEX vm_descriptions_vm_idx ON vm_descriptions (vm_instance_uuid, taken_at);
CREATE INDEX vm_descriptions_snapshot_idx ON vm_descriptions (vm_snapshot);

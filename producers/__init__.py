"""Producers (a role, floor 3): the edges that turn facts from vSphere into events on Kafka
(snapshots, CBT switching, orphaned snapshots). Imports only ``schemas`` and the ground."""

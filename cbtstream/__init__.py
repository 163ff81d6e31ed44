"""cbtstream: incremental, per-disk replication of VMware VMs with CBT, over Kafka.

This package is the shared ground (floor 2): configuration, the root error, logging, the Kafka,
vSphere and TLS adapters, the metrics registry and its HTTP server, extent arithmetic. It imports
only ``schemas`` (floor 1). The roles above it are ``producers`` (snapshot events in),
``streams`` (the Faust planner and its per-disk table) and ``consumers`` (copier and audit); the
command line, the local stack, the demo, the benchmarks and the replay are the roof, ``cbtctl``.
See docs/architecture.md, "The four floors".
"""

__version__ = "0.1.0"

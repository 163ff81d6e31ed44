"""cbtstream: incremental, per-disk replication of VMware VMs with CBT, over Kafka.

The top-level packages are ``schemas`` (event models), ``producers`` (snapshot events in),
``streams`` (the Faust planner and its per-disk table), ``consumers`` (copier and audit) and this
package, ``cbtstream``, which holds what they share: configuration, logging, errors, the vSphere
adapter, the local development stack and the command line.
"""

__version__ = "0.1.0"

"""The Faust planner: a table of each disk's latest committed change ID, and the decisions it
drives.

``streams.state``, ``streams.planner`` and ``streams.guard`` are pure (no Faust, no I/O) so the
replay tools and tests use the exact same rules as the running pipeline. Only ``streams.app``
imports Faust.
"""

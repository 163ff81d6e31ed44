"""The Faust planner: a table of each disk's latest committed change ID, and the decisions it
drives.

``streams.state``, ``streams.planner`` and ``streams.guard`` are pure (no Faust, no I/O) so the
replay tools and tests use the exact same rules as the running pipeline. Faust is imported only
inside this package (the app, its agents, views, overrides and worker), never by another role,
so the rest of cbtstream would survive replacing it.
"""

"""The audit trail: every pipeline event, idempotently, in PostgreSQL (see docs/architecture.md).

``consumer`` reads the topics, ``projection`` turns events into SQL (pure), ``repository`` is the
only module that imports asyncpg, ``migrations`` lists the versioned schema files.
"""

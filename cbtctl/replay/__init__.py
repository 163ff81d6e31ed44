"""Audit replay: rebuild and verify every disk's change-ID lineage from the Kafka log alone.

``records`` (log coordinates), ``order`` (a causal merge of the topics), ``lineage`` (the pure
replay through the planner and the commit guard), ``status`` (per-disk status), ``reader`` (the
Kafka adapter: group-less reads, offsets for times, consumer lag) and ``render`` (table / JSON).
"""

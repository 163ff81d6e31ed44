"""Restore points of a replica (the storage core; reverse incremental).

The live replica is always the newest point. Every older point keeps an *undo store*: the bytes
the syncs after it overwrote, saved durably before each overwrite. A point is read from the
oldest undo store at or after it that covers a byte, else from the live replica.

* :mod:`~consumers.points.coverage`: byte-range sets (pure);
* :mod:`~consumers.points.undo`: one point's undo store on disk (data, index, seal);
* :mod:`~consumers.points.catalogue`: the list of a disk's points (pure transitions + file);
* :mod:`~consumers.points.sources` and :mod:`~consumers.points.reader`: which source serves
  each byte of a point (pure), and reading a point in leaf-sized chunks;
* :mod:`~consumers.points.retention`: the pure planner of which points to drop, by the
  retention policy (``cbtstream.config.PointsPolicy``, the ``[points]`` settings);
* :mod:`~consumers.points.saving`: a target that saves the old bytes before every write;
* :mod:`~consumers.points.prune`: dropping points (delete, or merge into the older point);
* :mod:`~consumers.points.chain`: the order of effects a sync follows (begin, save, commit);
  the copier calls it through ``consumers/replica/points.py``.
"""

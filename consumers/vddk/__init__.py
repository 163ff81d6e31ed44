"""``copier.exports = "vddk"``: snapshot disks read through nbdkit's VDDK plugin.

* :mod:`.command` builds the exact nbdkit command line (pure; pinned by a golden test) and reads
  nbdkit's answers (``--dump-plugin``, errors);
* :mod:`.process` runs one nbdkit and stops it;
* :mod:`.exports` is the :class:`consumers.exports.ExportResolver` that puts them
  together per (disk, VM snapshot).
"""

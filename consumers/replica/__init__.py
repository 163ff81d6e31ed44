"""Replica integrity: where each disk's replica lives (``location``: placement from the
configuration only), what each replica is known to hold (``state``), where that record is kept
(``store``), the rules that decide whether a plan may be written onto it (``guard``), the order
of effects of one sync around the copy (``session``), and the re-hashing of replicas
(``verify``, ``patrol``)."""

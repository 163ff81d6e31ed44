"""Replica integrity: what each replica is known to hold (``state``), where that record is kept
(``store``), the rules that decide whether a plan may be written onto it (``guard``), and the
order of effects of one sync around the copy (``session``)."""

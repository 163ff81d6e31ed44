"""Consumers of the pipeline's decisions (a role, floor 3): the copier (plans in, replicas
written, outcomes out), with its copy engine, replica records, NBD client and snapshot exports,
and the audit consumer that keeps every event in PostgreSQL. Imports only ``schemas`` and the
ground ``cbtstream``."""

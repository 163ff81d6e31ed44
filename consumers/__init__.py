"""Consumers of the pipeline's decisions: the NBD client and the block copy engine."""

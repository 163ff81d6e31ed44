"""The block copy engine: changed extents from a source to a durable target."""

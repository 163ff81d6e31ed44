"""A pure-Python asyncio NBD client (no libnbd binding is on PyPI)."""

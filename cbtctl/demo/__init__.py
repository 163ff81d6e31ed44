"""The demo scenario: a multi-disk VM in the simulator replicated over several cycles through the
real pipeline. ``make demo`` runs it; the end-to-end tests drive the same :class:`Scenario`."""

"""The operator's roof (floor 4): the ``cbtstream`` command line and what only it runs.

``cli`` and ``commands/`` (one module per subcommand), ``demo/``, ``bench/``, ``stack/`` (the
local Kafka, PostgreSQL and vSphere simulator) and ``replay/`` (the auditor's reading of the log).
The roof may import every floor below it (the roles ``producers/``, ``streams/``,
``consumers/``; the ground ``cbtstream/``; ``schemas/``); nothing below imports the roof.
"""

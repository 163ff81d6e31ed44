"""One module per ``cbtstream`` subcommand (see :mod:`cbtctl.cli`)."""

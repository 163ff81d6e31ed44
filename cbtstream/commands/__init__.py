"""One module per ``cbtstream`` subcommand (see :mod:`cbtstream.cli`)."""

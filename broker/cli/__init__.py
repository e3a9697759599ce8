"""The ``edgesync`` command line: services, ``up``, status, commands, keys and
settings. :mod:`broker.cli.main` is the console script's entry point."""

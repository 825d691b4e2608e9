"""The ``erasekit`` command line: a thin shell over the Python API (see :func:`erasekit.cli.main.main`)."""

"""One module per benchmark suite or study; each has a ``Config`` (suites run by ``python -m benchmarks run``)
or a ``main(argv)`` (studies run by ``python -m benchmarks <name>``). See ``benchmarks/cli.py``."""

"""The command line, one module per concern: :mod:`.main` (the parser, formats,
compare, coverage, the quantize and step benchmarks), :mod:`.analyze` and
:mod:`.distributed` (train, bench comm). Parsing and display only: the work is done by
the library and :mod:`mixprec.experiments`."""

from mixprec.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

"""``python -m benchmarks.accelerator``: run the suite."""

import sys

from benchmarks.accelerator.options import parse_args

parse_args(sys.argv[1:])  # bad input: one line, before jax is imported

from benchmarks.accelerator.driver import main

main()

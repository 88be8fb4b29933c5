"""``python -m benchmarks.accelerator`` (or ``python benchmarks/accelerator``): run the suite."""

import sys

if not __package__:  # run as a directory (python benchmarks/accelerator): see benchmarks/_repo_on_path.py
    import os

    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.accelerator.options import parse_args  # noqa: E402

parse_args(sys.argv[1:])  # bad input: one line, before jax is imported

from benchmarks.accelerator.driver import main  # noqa: E402

main()

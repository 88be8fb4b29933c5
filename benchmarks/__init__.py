"""The benchmark scripts (docs/benchmarks.md), a package so they share code by plain imports.

Run one from the repository root as ``python -m benchmarks.<name>``.
"""

import os

# The repository root: scripts resolve their default config, data and results paths against it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

"""Imported first by a benchmark run as a file (``python benchmarks/<name>.py``).

Python then puts ``benchmarks/`` itself, not the repository root, first on sys.path, so neither the ``benchmarks``
package nor this checkout's ``tidar_jax`` would import (or an installed copy elsewhere would, silently). This swaps
that entry for the root, which makes the run behave exactly like ``python -m benchmarks.<name>`` from the root.
It is the one place the benchmarks touch sys.path; run as modules they import it never.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path[0] = _ROOT
elif _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

"""Import this module before any other: it imports what a user's script would import first.

    python benchmarks/models.py ... --import-first numpy|torch|npdiff

OpenBLAS settles its choices when NumPy loads it, so a benchmark run in another import order than a
user's script measures another program. A benchmark that imports this module first, before its
other imports, gets the module named by --import-first on its command line loaded first, and numpy
when none is named: nearly every user's script starts with `import numpy as np`.
"""

import importlib
import sys

IMPORTED_FIRST = sys.argv[sys.argv.index("--import-first") + 1] if "--import-first" in sys.argv else "numpy"
importlib.import_module(IMPORTED_FIRST)

"""What counts as an integer or a number in an option's value, from a command line, a batch line, the server's
JSON or a PNG's stored parameters: one rule for every entry point (npdiff/recipe.py, npdiff/sdxl_recipe.py and
their callers import it from here).

    is_int(64)        True       is_int(True), is_int(64.0)      False
    integral(64.0)    64         integral(64.5), integral(True)  unchanged, for the caller to refuse
    is_number(2.5)    True       is_number(True), is_number(nan) False
"""

import math


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def integral(value):
    """An integer option's value as given: an int as it is, a float with no fractional part (64.0, as many JSON
    writers emit 64) as that int; anything else unchanged, for the caller to refuse. The one rule for batch
    lines, the server's JSON fields and stored PNG parameters."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""The rules a config value can be asked to meet: each rule is called on a value and returns None when
the value is fine, else what the value must be ("an integer >= 1", "true or false", ...).

config_checks.py tables them per component; they are kept apart because they know nothing about any
model, only about JSON values.
"""

import math

import numpy as np


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


class Int:
    def __init__(self, least=1, odd=False, most=None):
        self.least, self.odd, self.most = least, odd, most

    def __call__(self, value):
        if (not _is_int(value) or value < self.least or (self.odd and value % 2 != 1)
                or (self.most is not None and value > self.most)):
            return (f"an integer >= {self.least}" + (f" and <= {self.most}" if self.most is not None else "")
                    + (" and odd" if self.odd else ""))
        return None


class IntIn:
    def __init__(self, *choices):
        self.choices = choices

    def __call__(self, value):
        return None if _is_int(value) and value in self.choices else f"one of {', '.join(map(str, self.choices))}"


class Float:
    """A finite number in [low, high]; `above` makes the low end open (value > low)."""

    def __init__(self, low=-math.inf, high=math.inf, above=False):
        self.low, self.high, self.above = low, high, above

    def __call__(self, value):
        ok = _is_number(value) and math.isfinite(float(value))
        if ok:
            value = float(value)
            ok = (value > self.low if self.above else value >= self.low) and value <= self.high
        if ok:
            return None
        low = f"> {self.low:g}" if self.above else (f">= {self.low:g}" if self.low > -math.inf else "")
        high = f"<= {self.high:g}" if self.high < math.inf else ""
        return "a finite number" + (" " + " and ".join(x for x in (low, high) if x) if low or high else "")


class Bool:
    def __call__(self, value):
        return None if isinstance(value, (bool, np.bool_)) else "true or false"


class OneOf:
    def __init__(self, *choices):
        self.choices = choices

    def __call__(self, value):
        if isinstance(value, (str, type(None))) and value in self.choices:
            return None
        return "one of " + ", ".join(repr(c) for c in self.choices)


class Text:
    def __call__(self, value):
        return None if isinstance(value, str) and value else "a non-empty string"


class ListOf:
    """A non-empty list of items that each pass `item`."""

    def __init__(self, item):
        self.item = item

    def __call__(self, value):
        if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0 or any(self.item(v) for v in value):
            return f"a non-empty list, each {self.item(None)}"
        return None


class OneOrList:
    """One value or a per-block list (its length is cross-checked against block_out_channels)."""

    def __init__(self, item):
        self.item = item

    def __call__(self, value):
        if isinstance(value, (list, tuple)):
            return ListOf(self.item)(value) and f"{self.item(None)} or a non-empty list of them"
        return self.item(value) and f"{self.item(None)} or a per-block list of them"


class Optional:
    def __init__(self, rule):
        self.rule = rule

    def __call__(self, value):
        return None if value is None else (self.rule(value) and f"null or {self.rule(value)}")


POSITIVE = Int(1)
# A count of layers (resnets per block, transformers per layer, CLIP's layers): the weight file must hold
# each one, and the deepest released model has 32 (SDXL's blocks 10, OpenCLIP bigG 32). A damaged config
# saying 10**9 is refused here, before the model builds a list of that many depths (8 GB for one list).
LAYER_COUNT = Int(1, most=1000)
EPS = Float(0.0, 1.0, above=True)

"""The one error class npdiff raises for bad input (files, keys, shapes, values).

It is a ValueError, so `except ValueError` keeps working for callers who don't know npdiff.
Messages name the thing that is wrong: the file, the key, the argument, the shape or value that was
expected and the one that was given.
"""


class NpdiffError(ValueError):
    """Bad input to npdiff: a file, key, shape or value that cannot be used, named in the message."""

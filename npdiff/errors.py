"""The one error class npdiff raises for bad input (files, keys, shapes, values).

It is a ValueError, so `except ValueError` keeps working for callers who don't know npdiff.
Messages name the thing that is wrong: the file, the key, the argument, the shape or value that was
expected and the one that was given.
"""


class NpdiffError(ValueError):
    """Bad input to npdiff: a file, key, shape or value that cannot be used, named in the message."""


MESSAGE_CHARS = 80  # a value quoted in a message is cut to this many characters


def shorten(value, limit=MESSAGE_CHARS):
    """repr(value) cut to about `limit` characters: a message never echoes a 10 MB prompt read from a file."""
    try:
        text = repr(value[:limit + 1]) if isinstance(value, str) else repr(value)
    except ValueError:  # an int past Python's 4300-digit limit on int -> str, or a list or dict holding one
        if isinstance(value, int):
            return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
        return f"a {type(value).__name__} holding an integer of over 4300 digits"
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
    return f"{text[:limit]}... ({size})"


def clip(value, limit=MESSAGE_CHARS):
    """str(value) cut to about `limit` characters, for text quoted in a message as it is (no quotes added)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"

"""The JSON files a model folder holds (config.json, scheduler_config.json, model_index.json, shard
indexes, tokenizer files), read by one function so that each kind of damage fails the same way:

    read_json(path) -> dict     NpdiffError naming the file when it is missing, is not a regular file
                                (a FIFO, device or symlink loop: npdiff/paths.py), is not valid JSON
                                (or not UTF-8), or holds something other than a JSON object
"""

import json
import os

from npdiff.errors import NpdiffError
from npdiff.paths import regular_file


def read_json(path):
    """A JSON object from `path`; NpdiffError naming the file if it is missing, not a regular file or
    not a JSON object."""
    path = os.fspath(path)
    regular_file(path, "a JSON file")
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and an integer of over 4300 digits
        raise NpdiffError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise NpdiffError(f"{path} should hold a JSON object, found a {type(value).__name__}")
    return value

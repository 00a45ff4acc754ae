"""Which weights were already found finite: loading's NaN/Inf check, remembered per file.

Loading checks every value of every weight for NaN/Inf (npdiff/loading/weights.py says why it must be at
load). For a memory-mapped float32 weight that check is most of the load: it reads every page of the
files (4.0 GB for SD 1.5) that the job then reads again on its first call. A user runs `npdiff generate`
on the same model again and again, each a fresh process, so the answer is kept on disk:

    finite-checks.json in npdiff's cache folder (npdiff.cache_folder):
      {"version": 1, "files": {resolved path: {size, mtime_ns, ctime_ns, inode, device, "keys": [...]}}}

  known_finite(path, identity)    the stored keys of that file found finite before, while the file's
                                  identity (npdiff.cache_folder.file_identity) is the one recorded then;
                                  an empty set for a changed, replaced or unknown file, or an unreadable
                                  cache (a damaged cache only costs the check)
  remember_finite(path, identity, keys)   adds `keys` (stored names; "name[a:b]" for rows a:b of a fused
                                  tensor) to the file's entry, when the file is unchanged since it was
                                  opened and has settled (below)

Only keys whose check ran to the end and found every value finite are remembered; a file whose bytes
change gets a new identity and is checked in full again. Rules that keep a changed file from being
taken for the checked one:
  - identity = size, mtime, ctime, inode and device: a file replaced (written elsewhere and renamed over,
    as downloads and converters do) has a new inode; one rewritten in place a new ctime.
  - "settled" (the racy-git rule): a file is remembered only once its ctime is SETTLED_NS older than the
    clock. File times advance in ticks (a few ms on some file systems), so a file rewritten within the
    tick of the check could keep its times; once the times lie a whole second back, any later change
    gets a later ctime. A file written just before loading (every test's tiny model) is checked each
    time, as before.
  - what it cannot see: bits that rot on the disk without any write. The check was for damaged
    downloads and conversions, which are new files.
The cache file is replaced atomically (a temporary file in the same folder, then os.replace): a reader
sees the old or the new one, never half of one. Two processes remembering at once each re-read and merge
before writing; the later write wins, and what the other added is checked again next time. Entries of
files that no longer exist are dropped when the cache is written.
"""

import os
import time

from npdiff.cache_folder import (
    cache_folder,
    file_identity,
    read_file_records,
    write_file_records,
)

CACHE_VERSION = 1
SETTLED_NS = 1_000_000_000  # a file is remembered only when its ctime is this far behind the clock
_known = {}  # (path, identity items) -> frozenset of keys: the cache file is read once per file and process


def cache_path():
    """Where the record lives: finite-checks.json in npdiff's cache folder."""
    return cache_folder() / "finite-checks.json"


def identity_items(identity):
    """A file identity dict as a hashable tuple."""
    return tuple(sorted(identity.items()))


def _read_entries(path):
    """{resolved path: entry} from the cache file; {} when it is missing, damaged or of another version."""
    return {name: entry for name, entry in read_file_records(path, CACHE_VERSION).items()
            if isinstance(entry, dict) and isinstance(entry.get("keys"), list)}


def _matches(entry, identity):
    return all(entry.get(name) == value for name, value in identity.items())


def known_finite(path, identity):
    """The stored keys of the file at `path` (resolved) found finite before, if its `identity` is unchanged."""
    memo_key = (path, identity_items(identity))
    if memo_key not in _known:
        entry = _read_entries(cache_path()).get(path)
        keys = entry["keys"] if entry is not None and _matches(entry, identity) else []
        _known[memo_key] = frozenset(key for key in keys if isinstance(key, str))
    return _known[memo_key]


def settled(identity, now_ns=None):
    """True when the file's last change (ctime) lies at least SETTLED_NS behind the clock."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    return now_ns - identity["ctime_ns"] >= SETTLED_NS


def remember_finite(path, identity, keys):
    """Record `keys` of the file at `path` (resolved) as finite, for a file still of `identity` and settled."""
    keys = set(keys)
    if not keys or not settled(identity):
        return
    try:
        if file_identity(path) != identity:  # changed since it was opened: what was checked is not this file
            return
    except OSError:
        return
    store = cache_path()
    entries = _read_entries(store)  # re-read: another process may have added entries meanwhile
    entries = {name: entry for name, entry in entries.items() if os.path.isfile(name)}  # forget deleted files
    entry = entries.get(path)
    if entry is not None and _matches(entry, identity):
        keys |= {key for key in entry["keys"] if isinstance(key, str)}
    entries[path] = {**identity, "keys": sorted(keys)}
    write_file_records(store, CACHE_VERSION, entries)
    _known[(path, identity_items(identity))] = frozenset(keys)

"""memory_estimate.PictureSizeError crosses process boundaries whole: an exception raised in a worker process
(concurrent.futures, multiprocessing, Ray) is pickled there and rebuilt in the caller. Before, rebuilding
called PictureSizeError(message) without `lower` (TypeError), which breaks a ProcessPoolExecutor
(BrokenProcessPool) instead of raising the refusal."""

import pickle

from npdiff.memory_estimate import KEYWORD_HINTS, PictureSizeError


def test_a_size_refusal_survives_pickling(rng):
    keys = tuple(rng.permutation(sorted(KEYWORD_HINTS))[:int(rng.integers(1, len(KEYWORD_HINTS) + 1))])
    error = PictureSizeError(f"{int(rng.integers(1, 9)) * 1024}x64 pixels is too large", keys)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is PictureSizeError
    assert (copy.problem, copy.lower, str(copy)) == (error.problem, error.lower, str(error))
    hints = {key: f"lower {key}!" for key in KEYWORD_HINTS}
    assert copy.hinted(hints) == error.hinted(hints)

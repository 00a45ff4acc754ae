"""npdiff's CLIPTokenizer against transformers' CLIPTokenizer, both reading the same real CLIP vocabulary
(rebuilt offline by npdiff.clip_vocab), on fixed tricky prompts and on freshly generated random ones."""

import json
import warnings

import numpy as np
import pytest

from npdiff import NpdiffError
from npdiff.clip_vocab import write_clip_tokenizer_folder
from npdiff.tokenizer import CLIPTokenizer, PromptTruncatedWarning

import transformers

FIXED_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "   leading and trailing spaces   ",
    "Tabs\tand\nnewlines\r\n  and   runs of   spaces",
    "UPPER case, MiXeD case; punctuation!?... (brackets) [square] {curly} <angle>",
    "numbers 1234567890 3.14159 1e-5 -42 100%",
    "it's what they've said: we'll, I'd, you're, I'm, don't",
    "東京の夜景、ネオン、雨", "中文提示词：一只猫在月亮上", "한국어 프롬프트",
    "Москва зимой, снег", "Ελληνικά γράμματα αβγδ", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ",
    "emoji 🐱🚀🌕 👩‍🚀 🏳️‍🌈 ❤️", "café naïve résumé Ångström ß ﬁ", "full-width ＡＢＣ１２３",
    "a <cat-toy> sitting on a <my_style> chair", "<|startoftext|> inside <|endoftext|> text",
    "hello!!! world!? a!b", "'quoted' \"double\" `back` ’curly’ “curly”",
    "masterpiece, best quality, ((highly detailed)), [[low]], (word:1.2)",
    "a_b-c.d/e\\f|g~h^i&j*k+l=m#n@o$p",
    " ".join(["word"] * 100),
    "an extremely long prompt " + ", ".join(f"detail number {i}" for i in range(40)),
    "🐱" * 90,
]

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", ".,;:!?'\"()[]{}<>-_/\\*&^%$#@~`|+=",
    "東京夜景雨猫月亮一只在上中文", "абвгдеёжзийклмнопрстуфхцчшщъыьэюя", "αβγδεζηθικλμνξοπρστυφχψω",
    "ابتثجحخدذرزسشصضطظعغفقكلمنهوي", "🐱🚀🌕👩❤️🎨🔥✨", "éèêëàâäîïôöùûüçñß", " \t\n",
]


def random_prompt(rng):
    """A prompt of 0..120 'words' drawn from mixed alphabets (often more than 75 tokens)."""
    words = []
    for _ in range(int(rng.integers(0, 120))):
        alphabet = ALPHABETS[int(rng.integers(len(ALPHABETS)))]
        length = int(rng.integers(1, 9))
        words.append("".join(alphabet[int(rng.integers(len(alphabet)))] for _ in range(length)))
    separators = [" ", " ", " ", ", ", "  ", "\n"]
    return "".join(w + separators[int(rng.integers(len(separators)))] for w in words)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tokenizer_pair(request, tmp_path_factory):
    """(npdiff tokenizer, transformers tokenizer) over one folder: SD 1.x pads with <|endoftext|>, SD 2.x with '!'."""
    pad = "<|endoftext|>" if request.param == "sd1" else "!"
    folder = write_clip_tokenizer_folder(tmp_path_factory.mktemp(request.param) / "tokenizer", pad_token=pad)
    ours = CLIPTokenizer.from_pretrained(folder.parent)  # a model folder holding tokenizer/
    theirs = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return ours, theirs


def reference_ids(theirs, prompts):
    out = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    return out["input_ids"].astype(np.int64)


def ours_quiet(ours, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return ours(prompts)


def test_special_ids_match(tokenizer_pair):
    ours, theirs = tokenizer_pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert len(ours) == len(theirs)


def test_fixed_prompts_match_transformers(tokenizer_pair):
    ours, theirs = tokenizer_pair
    ids = ours_quiet(ours, FIXED_PROMPTS)
    assert ids.dtype == np.int64 and ids.shape == (len(FIXED_PROMPTS), 77)
    expected = reference_ids(theirs, FIXED_PROMPTS)
    for row, prompt in enumerate(FIXED_PROMPTS):
        assert ids[row].tolist() == expected[row].tolist(), f"prompt {prompt!r}"


@pytest.mark.parametrize("case", range(4))
def test_random_prompts_match_transformers(tokenizer_pair, rng, case):
    ours, theirs = tokenizer_pair
    prompts = [random_prompt(rng) for _ in range(25)]
    ids = ours_quiet(ours, prompts)
    expected = reference_ids(theirs, prompts)
    for row, prompt in enumerate(prompts):
        assert ids[row].tolist() == expected[row].tolist(), f"prompt {prompt!r}"


def test_single_prompt_is_a_batch_of_one(tokenizer_pair):
    ours, theirs = tokenizer_pair
    ids = ours("a photo of an astronaut riding a horse on mars")
    assert ids.shape == (1, 77)
    assert ids.tolist() == reference_ids(theirs, ["a photo of an astronaut riding a horse on mars"]).tolist()


def test_long_prompt_warns_with_number_dropped(tokenizer_pair):
    ours, theirs = tokenizer_pair
    prompt = " ".join(["cat"] * 80)  # one token per word: 80 tokens, 75 fit
    with pytest.warns(PromptTruncatedWarning, match=r"80 tokens .* the last 5 were dropped"):
        ids = ours([prompt])
    assert ids.tolist() == reference_ids(theirs, [prompt]).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        ours([" ".join(["cat"] * 75)])  # exactly 75: no warning


def test_added_tokens_match_transformers(tmp_path):
    """Textual inversion words: same ids as transformers' add_tokens, in any casing/position."""
    folder = write_clip_tokenizer_folder(tmp_path / "tokenizer")
    ours = CLIPTokenizer.from_pretrained(folder)
    theirs = transformers.CLIPTokenizer.from_pretrained(str(folder))
    new = ["<cat-toy>", "<my_style>", "<my_style>_1", "sks"]
    new_ids = ours.add_tokens(new)
    theirs.add_tokens(new)
    assert new_ids == theirs.convert_tokens_to_ids(new) == list(range(49408, 49412))
    assert len(ours) == len(theirs)
    prompts = ["a <cat-toy> on a <my_style> <my_style>_1 chair", "A <CAT-TOY>!", "x<cat-toy>y sks dog",
               "<my_style>_1<my_style>", "no placeholder here"]
    assert ours(prompts).tolist() == reference_ids(theirs, prompts).tolist()
    with pytest.raises(NpdiffError, match="already in the tokenizer"):
        ours.add_tokens("<cat-toy>")


def test_multi_vector_expansion(tmp_path):
    folder = write_clip_tokenizer_folder(tmp_path / "tokenizer")
    ours = CLIPTokenizer.from_pretrained(folder)
    theirs = transformers.CLIPTokenizer.from_pretrained(str(folder))
    names = ["<s>", "<s>_1", "<s>_2"]
    ours.add_tokens(names)
    theirs.add_tokens(names)
    ours.register_multi_vector("<s>", names)
    assert ours.expand_multi_vector_tokens("a <s> chair") == "a <s> <s>_1 <s>_2 chair"
    assert ours(["a <s> chair"]).tolist() == reference_ids(theirs, ["a <s> <s>_1 <s>_2 chair"]).tolist()


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(NpdiffError, match="vocab.json and merges.txt"):
        CLIPTokenizer.from_pretrained(tmp_path)
    folder = write_clip_tokenizer_folder(tmp_path / "tokenizer")
    (folder / "special_tokens_map.json").write_text("{not json")
    with pytest.raises(NpdiffError, match="special_tokens_map.json is not valid JSON"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|no-such-token|>"}))
    with pytest.raises(NpdiffError, match="pad_token"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_bad_prompt_type(tokenizer_pair):
    ours, _ = tokenizer_pair
    with pytest.raises(NpdiffError, match="prompt must be a string"):
        ours(123)
    with pytest.raises(NpdiffError, match="prompt must be a string"):
        ours(["ok", None])


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_folder_saved_by_transformers_reads_tokenizer_json(tmp_path, rng, pad):
    """transformers 5 saves tokenizer.json (no vocab.json/merges.txt): same ids, added words kept."""
    source = write_clip_tokenizer_folder(tmp_path / "source", pad_token=pad)
    theirs = transformers.CLIPTokenizer.from_pretrained(str(source))
    theirs.add_tokens(["<saved-word>"])
    theirs.save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "vocab.json").exists()
    ours = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    prompts = FIXED_PROMPTS[:20] + [random_prompt(rng) for _ in range(10)] + ["a <saved-word> here!"]
    assert ours.pad_token_id == theirs.pad_token_id and len(ours) == len(theirs)
    assert ours_quiet(ours, prompts).tolist() == reference_ids(theirs, prompts).tolist()

"""The CLIP tokenizer of Stable Diffusion, driven by the `tokenizers` library.

Stable Diffusion's text encoder reads 77 token ids: <|startoftext|>, at most 75 prompt tokens, then
<|endoftext|>, then padding. The ids come from CLIP's byte-level BPE (49,408 entries), which diffusers
model folders ship as tokenizer/vocab.json + tokenizer/merges.txt (folders saved by transformers 5 hold
the same vocabulary and merges inside tokenizer/tokenizer.json instead; both are read). This module
builds from them the same `tokenizers.Tokenizer` that transformers' CLIPTokenizer builds, so the ids
are identical (tests/test_tokenizer.py checks it on many prompts):

  1. normalizer:     NFC, runs of whitespace -> one space, lowercase;
  2. pre-tokenizer:  split on CLIP's pattern (keep the matches), then byte-level without a prefix space;
  3. model:          BPE with "</w>" marking the end of a word, unknown pieces -> <|endoftext|>;
  4. special tokens: start, end, unknown and pad are added as special tokens (matched in the raw text,
                     never split); SD 2.x pads with "!" (id 0), so a "!" in a prompt becomes id 0 there,
                     exactly as transformers does;
  5. wrapping:       [start] + the first 75 prompt ids + [end], padded to 77 with the pad id; a longer
                     prompt is truncated with a PromptTruncatedWarning saying how many tokens were dropped.

The pad id comes from the folder (special_tokens_map.json, else tokenizer_config.json): SD 1.x pads with
<|endoftext|> (49407), SD 2.x with "!" (0).

Textual inversion adds words with `add_tokens` (ordinary added tokens, matched in the normalized text
like transformers' `add_tokens`); a multi-vector embedding registers its extra names with
`register_multi_vector` and `expand_multi_vector_tokens` rewrites "<cat>" as "<cat> <cat>_1 <cat>_2"
before tokenizing, as diffusers' `maybe_convert_prompt` does.
"""

import warnings
from pathlib import Path

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.json_files import read_json

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
CLIP_SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                      r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
TOKENIZER_JSON = "tokenizer.json"


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder reads; the rest was dropped."""


def check_prompt_text(text, what="prompt"):
    """NpdiffError unless `text` is a str of valid Unicode (no lone surrogates); names the character.

    A lone surrogate (U+D800..U+DFFF) is what Python makes of bytes that are not UTF-8 (a command-line
    argument in another encoding arrives as U+DC80..U+DCFF); the tokenizer cannot take it.
    """
    if isinstance(text, (bytes, bytearray)):
        raise NpdiffError(f"{what} must be text (str), got bytes {bytes(text[:20])!r}; decode it first, "
                          "e.g. .decode('utf-8')")
    if not isinstance(text, str):
        raise NpdiffError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        if 0xDC80 <= ord(char) <= 0xDCFF:  # surrogateescape: an undecodable byte
            detail = f"byte 0x{ord(char) - 0xDC00:02x} that is not UTF-8"
        else:
            detail = f"a lone surrogate {char!r} (U+{ord(char):04X})"
        raise NpdiffError(f"{what} has {detail} at character {exc.start}; prompts must be valid Unicode "
                          "text (save or type them as UTF-8)") from None
    return text


def _token_text(value):
    """special_tokens_map.json stores a token as "text" or as {"content": "text", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _has_tokenizer_files(folder):
    return all((folder / name).is_file() for name in TOKENIZER_FILES) or (folder / TOKENIZER_JSON).is_file()


def find_tokenizer_folder(folder):
    """`folder` itself if it holds the tokenizer files, else folder/tokenizer; NpdiffError if neither."""
    folder = Path(folder)
    for candidate in (folder, folder / "tokenizer"):
        if _has_tokenizer_files(candidate):
            return candidate
    raise NpdiffError(
        f"no CLIP tokenizer in {folder}: expected {' and '.join(TOKENIZER_FILES)} (or {TOKENIZER_JSON}) in it "
        f"or in {folder / 'tokenizer'}")


def read_vocab_and_merges(folder):
    """-> (vocab dict token -> id, merges [(a, b)], added tokens [(id, text)] beyond the BPE vocabulary)."""
    from tokenizers.models import BPE

    if all((folder / name).is_file() for name in TOKENIZER_FILES):
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        return vocab, merges, []
    data = read_json(folder / TOKENIZER_JSON)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise NpdiffError(f"{folder / TOKENIZER_JSON} holds no BPE model (model.type is {model.get('type')!r})")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model.get("merges", [])]
    added = [(t["id"], t["content"]) for t in data.get("added_tokens", [])
             if not t.get("special") and t["content"] not in model["vocab"]]
    return model["vocab"], merges, sorted(added)


class CLIPTokenizer:
    """Prompt text -> int64 token ids [B, 77], identical to transformers' CLIPTokenizer.

    tokenizer = CLIPTokenizer.from_pretrained("model_folder")   # reads model_folder/tokenizer/
    ids = tokenizer(["a photo of a cat", "a dog"])              # [2, 77] int64
    """

    def __init__(self, vocab, merges, pad_token=END_TOKEN, model_max_length=77,
                 bos_token=START_TOKEN, eos_token=END_TOKEN, unk_token=END_TOKEN, source="vocabulary"):
        """vocab: dict token -> id; merges: list of (a, b) pairs in priority order; source: for messages."""
        from tokenizers import (
            AddedToken,
            Regex,
            Tokenizer,
            decoders,
            normalizers,
            pre_tokenizers,
        )
        from tokenizers.models import BPE

        for what, text in (("bos_token", bos_token), ("eos_token", eos_token), ("unk_token", unk_token),
                           ("pad_token", pad_token)):
            if text not in vocab:
                raise NpdiffError(f"{what} {text!r} is not in the vocabulary of {source}")
        # 3. the BPE model: "</w>" ends a word, no prefix on continuing pieces, unknown -> unk.
        self.backend = Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                                     unk_token=unk_token, fuse_unk=False))
        # 1. normalizer
        self.backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # 2. pre-tokenizer: "removed" + invert=True keeps the pattern's matches and drops what is between
        self.backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        self.backend.decoder = decoders.ByteLevel()
        # 4. special tokens, matched in the raw text before normalization (as transformers adds them)
        special = []
        for text in (bos_token, eos_token, unk_token, pad_token):
            if text not in [t.content for t in special]:
                special.append(AddedToken(text, special=True, normalized=False))
        self.backend.add_special_tokens(special)

        self.model_max_length = int(model_max_length)
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = vocab[bos_token]
        self.eos_token_id = vocab[eos_token]
        self.pad_token_id = vocab[pad_token]
        self.multi_vector_tokens = {}  # textual inversion: "<cat>" -> ["<cat>", "<cat>_1", ...]

    @classmethod
    def from_pretrained(cls, folder, subfolder=None):
        """Read a tokenizer folder: vocab.json + merges.txt (or tokenizer.json), special_tokens_map.json,
        tokenizer_config.json.

        `folder` may be the tokenizer folder itself or a model folder holding tokenizer/.
        """
        folder = Path(folder) / subfolder if subfolder else Path(folder)
        folder = find_tokenizer_folder(folder)
        try:
            return cls._from_folder(folder)
        except NpdiffError:
            raise
        except Exception as exc:  # the tokenizers library raises a bare Exception for a garbage vocab.json
            raise NpdiffError(f"the tokenizer files in {folder} cannot be read ({type(exc).__name__}: {exc}); "
                              "expected CLIP's vocab.json (token -> id) and merges.txt, or tokenizer.json"
                              ) from exc

    @classmethod
    def _from_folder(cls, folder):
        """from_pretrained's body, on a folder that holds the tokenizer files."""
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = read_json(folder / "tokenizer_config.json")
        special = {}
        if (folder / "special_tokens_map.json").is_file():
            special = read_json(folder / "special_tokens_map.json")

        def token(name, default):
            value = _token_text(special.get(name)) or _token_text(config.get(name))
            return value or default

        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, int) or max_length > 10**6:  # transformers writes 1e30 for "none"
            max_length = 77
        if max_length < 3:
            raise NpdiffError(f"{folder / 'tokenizer_config.json'}: model_max_length must be at least 3 (start, "
                              f"one token, end), got {max_length}")
        vocab, merges, added = read_vocab_and_merges(folder)
        tokenizer = cls(vocab, merges, pad_token=token("pad_token", END_TOKEN), model_max_length=max_length,
                        bos_token=token("bos_token", START_TOKEN), eos_token=token("eos_token", END_TOKEN),
                        unk_token=token("unk_token", END_TOKEN), source=str(folder))
        for token_id, text in added:  # words added before saving (textual inversion), in id order
            if tokenizer.add_tokens([text]) != [token_id]:
                raise NpdiffError(f"{folder / TOKENIZER_JSON}: added token {text!r} should have id {token_id}")
        return tokenizer

    def __len__(self):
        """Number of ids: the BPE vocabulary plus added tokens (textual inversion)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self):
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def tokenize(self, prompt):
        """The token strings of a prompt (no start/end), e.g. ['a</w>', 'photo</w>']."""
        return self.backend.encode(prompt, add_special_tokens=False).tokens

    def encode(self, prompt):
        """The prompt's ids without start/end and without truncation (a list of ints)."""
        return self.backend.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids):
        """ids -> text, with the "</w>" word ends turned back into spaces."""
        return self.backend.decode(list(ids)).replace("</w>", " ").strip()

    # ------------------------------------------------------------------------------------------
    # Textual inversion
    # ------------------------------------------------------------------------------------------
    def add_tokens(self, tokens):
        """Add new words (textual inversion placeholders); -> their ids, in order.

        They become ordinary added tokens (not special, matched after normalization), the way
        transformers' add_tokens adds them; the ids follow the vocabulary: len(tokenizer), len+1, ...
        """
        if isinstance(tokens, str):
            tokens = [tokens]
        vocab = self.get_vocab()
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise NpdiffError(f"add_tokens: a token must be a non-empty string, got {token!r}")
            if token in vocab:
                raise NpdiffError(f"add_tokens: token {token!r} is already in the tokenizer vocabulary")
        self.backend.add_tokens(list(tokens))
        return [self.backend.token_to_id(t) for t in tokens]

    def register_multi_vector(self, token, names):
        """Remember that `token` stands for several added tokens `names` (token, token_1, ...)."""
        self.multi_vector_tokens[token] = list(names)

    def expand_multi_vector_tokens(self, prompt):
        """"a <cat> toy" -> "a <cat> <cat>_1 <cat>_2 toy" for a 3-vector <cat> (diffusers' maybe_convert_prompt)."""
        if not self.multi_vector_tokens:
            return prompt
        present = set(self.tokenize(prompt))
        for token, names in self.multi_vector_tokens.items():
            if token in present:
                prompt = prompt.replace(token, " ".join(names))
        return prompt

    # ------------------------------------------------------------------------------------------
    # Prompts -> ids
    # ------------------------------------------------------------------------------------------
    def __call__(self, prompts):
        """A prompt or a list of prompts -> int64 ids [B, model_max_length] (start, tokens, end, pad)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise NpdiffError(f"prompt must be a string or a list of strings, got {type(prompts).__name__}")
        for row, prompt in enumerate(prompts):
            check_prompt_text(prompt, f"prompt {row}" if len(prompts) > 1 else "prompt")
        prompts = [self.expand_multi_vector_tokens(p) for p in prompts]
        room = self.model_max_length - 2  # positions between the start and the end token
        ids = np.full((len(prompts), self.model_max_length), self.pad_token_id, dtype=np.int64)  # [B,77]
        encodings = self.backend.encode_batch(prompts, add_special_tokens=False)
        for row, (prompt, encoding) in enumerate(zip(prompts, encodings)):
            tokens = encoding.ids
            if len(tokens) > room:
                dropped = tokens[room:]
                warnings.warn(
                    f"prompt {row} has {len(tokens)} tokens but CLIP reads {room}: the last {len(dropped)} "
                    f"were dropped ({self.decode(dropped)!r})", PromptTruncatedWarning, stacklevel=2)
                tokens = tokens[:room]
            ids[row, 0] = self.bos_token_id
            ids[row, 1:len(tokens) + 1] = tokens
            ids[row, len(tokens) + 1] = self.eos_token_id
        return ids

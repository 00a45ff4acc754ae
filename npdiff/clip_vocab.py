"""Building the CLIP tokenizer files (vocab.json, merges.txt) without a model hub.

Stable Diffusion 1.x uses the byte-level BPE tokenizer of openai/clip-vit-large-patch14 (49,408 ids).
Every diffusers model folder ships it as `tokenizer/vocab.json` + `tokenizer/merges.txt`; when no model
folder is at hand (tests, the shipped model's training script), the same files can be rebuilt from
`bpe_simple_vocab_16e6.txt.gz`, which the PyPI package `openai-clip` carries (it installs without
torch; we only read its data file and never import it).

From the BPE file:
  1. merges = lines 1 .. 48894 (line 0 is a header);
  2. vocab  = the 256 byte-to-unicode characters (GPT-2's mapping), the same 256 with "</w>" appended,
              one entry per merge (its two halves joined), then <|startoftext|> and <|endoftext|>:
              256 + 256 + 48894 + 2 = 49,408 ids.
Written the way transformers saves them, the files are byte-identical to the hub's.
This module is a tool for tests and scripts; the runtime tokenizer (npdiff/tokenizer.py) only reads
the files from a model folder.
"""

import gzip
import importlib.util
import json
from pathlib import Path

from npdiff.errors import NpdiffError

NUM_MERGES = 48894  # 49408 - 256 - 256 - 2
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


def find_openai_clip_bpe():
    """Path of bpe_simple_vocab_16e6.txt.gz inside the installed `openai-clip` package."""
    spec = importlib.util.find_spec("clip")
    if spec is None or spec.origin is None:
        raise NpdiffError("the CLIP BPE file comes from the PyPI package 'openai-clip' "
                          "(pip install openai-clip), which is not installed")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise NpdiffError(f"openai-clip is installed but {path} is missing")
    return path


def build_clip_vocab(bpe_path=None):
    """-> (vocab: dict token -> id, merges: list of 'a b' strings) from the openai-clip BPE file."""
    bpe_path = Path(bpe_path) if bpe_path is not None else find_openai_clip_bpe()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer_folder(folder, pad_token=END_TOKEN, model_max_length=77, bpe_path=None):
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json into `folder`.

    pad_token: SD 1.x pads with <|endoftext|>; SD 2.x (OpenCLIP) pads with "!" (id 0).
    transformers' CLIPTokenizer.from_pretrained(folder) loads the result offline.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_vocab(bpe_path)
    (folder / "vocab.json").write_text(
        json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN,
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder

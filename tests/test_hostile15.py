"""Hostile input on what users bring as files and text: LoRA files (their header's adapter metadata, scales of
hundreds of digits), textual-inversion embeddings, webui prompt syntax, and the training commands. Each case
here failed before its fix (a ValueError/AttributeError/OverflowError traceback, NaN text embeddings that
sample a black picture, a NaN file written, a bad scale found only after the model loaded, a file written
under a name the user meant as a folder); each is now an NpdiffError naming the problem, before the work,
with nothing changed or written."""

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
sys.path.insert(0, str(Path(__file__).parent / "training"))

from lora_helpers import all_weights, assert_untouched, load_ours  # noqa: E402
from test_textual_inversion import draw_pictures  # noqa: E402
from tiny_sd import CLIP_CONFIG, tiny_sd_folder  # noqa: E402
from tiny_sdxl import CLIP_G, CLIP_L, tiny_sdxl_folder  # noqa: E402

from npdiff import cli  # noqa: E402
from npdiff import lora as npdiff_lora  # noqa: E402
from npdiff.errors import NpdiffError  # noqa: E402
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline  # noqa: E402
from npdiff import prompt_parser  # noqa: E402
from npdiff.prompt_parser import parse_prompt_attention  # noqa: E402
from npdiff.training import textual_inversion, train_lora  # noqa: E402
from npdiff.training.pictures import check_templates  # noqa: E402

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)

WIDTH = CLIP_CONFIG["hidden_size"]
LAYER = "down_blocks.0.attentions.0.proj_in"  # the tiny UNet's 1x1 conv, weight [32,32,1,1]


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


@pytest.fixture(scope="module")
def pipe(folder):
    return load_ours(folder)


# ---------------------------------------------------------------------------------------------------------------
# LoRA files
# ---------------------------------------------------------------------------------------------------------------
def diffusers_lora(path, rng, metadata=None):
    """A diffusers-layout LoRA on LAYER (rank 4), with `metadata` as its header's "lora_adapter_metadata"."""
    def random(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.1)

    tensors = {f"unet.{LAYER}.lora_A.weight": random(4, 32, 1, 1), f"unet.{LAYER}.lora_B.weight": random(32, 4, 1, 1)}
    header = None if metadata is None else {"lora_adapter_metadata": metadata}
    save_file(tensors, str(path), metadata=header)
    return path


@pytest.mark.parametrize("metadata,words", [
    ("[1, 2]", "is a JSON list; expected an object"),
    (json.dumps({"unet.lora_alpha": "eight"}), "unet.lora_alpha is 'eight'; expected a finite number"),
    (json.dumps({"unet.lora_alpha": True}), "unet.lora_alpha is True; expected a finite number"),
    ('{"unet.lora_alpha": 1' + "0" * 400 + "}", r"unet.lora_alpha is 10000.*; expected a finite number"),
    (json.dumps({"unet.alpha_pattern": ["proj_in"]}), "unet.alpha_pattern is a JSON list; expected an object"),
    (json.dumps({"unet.alpha_pattern": {"proj_in": None}}), r"unet.alpha_pattern\['proj_in'\] is None"),
    (json.dumps({"unet.alpha_pattern": {"^(down": 4}}), r"unet.alpha_pattern '\^\(down' is not a regular expression"),
], ids=["list", "alpha_text", "alpha_bool", "alpha_400_digits", "pattern_list", "pattern_null", "pattern_regex"])
def test_malformed_adapter_metadata_is_refused_naming_the_entry(folder, tmp_path, rng, metadata, words):
    """Before: AttributeError, ValueError, OverflowError or re.error tracebacks (or True read as alpha 1)."""
    ours = load_ours(folder)
    ours.load_lora_weights(diffusers_lora(tmp_path / "first.safetensors", rng), scale=0.5)
    before = all_weights(ours)
    path = diffusers_lora(tmp_path / "bad.safetensors", rng, metadata)
    with pytest.raises(NpdiffError, match=rf"bad.safetensors: header entry 'lora_adapter_metadata'.*{words}"):
        ours.load_lora_weights(path)
    assert_untouched(ours, before)
    assert [lora.name for lora in ours._lora_stack.loaded] == ["first"]


def test_good_adapter_metadata_still_gives_its_alpha(folder, tmp_path, rng):
    path = diffusers_lora(tmp_path / "good.safetensors", rng,
                          json.dumps({"unet.lora_alpha": 2, "unet.alpha_pattern": {"^down_blocks\\.0\\..*": 8.0}}))
    ours = load_ours(folder)
    layer = npdiff_lora.named_layers(ours.unet, "unet")[LAYER]
    original = np.array(layer.weight)
    ours.load_lora_weights(path)
    tensors = {key: value.numpy() for key, value in load_file(str(path)).items()}
    update = tensors[f"unet.{LAYER}.lora_B.weight"][:, :, 0, 0] @ tensors[f"unet.{LAYER}.lora_A.weight"][:, :, 0, 0]
    expected = original + (8.0 / 4) * update.reshape(original.shape)  # the pattern's alpha, not lora_alpha
    np.testing.assert_allclose(np.asarray(layer.weight), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [10**400, -(10**400), 10**5000], ids=["400_digits", "minus_400", "5000_digits"])
def test_a_scale_of_hundreds_of_digits_is_refused(pipe, tmp_path, rng, scale):
    """Before: OverflowError (int too large to convert to float). repr(10**5000) raises ValueError (Python's
    4300-digit limit), so npdiff.errors.shorten names its size instead."""
    before = all_weights(pipe)
    with pytest.raises(NpdiffError, match="LoRA scale must be finite, got (1000|-1000|an integer of about 5000 dig)"):
        pipe.load_lora_weights(diffusers_lora(tmp_path / "l.safetensors", rng), scale=scale)
    assert_untouched(pipe, before)


@pytest.mark.parametrize("scale", ["nan", "1e309", "-inf"])
def test_cli_refuses_a_non_finite_lora_scale_before_the_model_loads(tmp_path, rng, capsys, scale):
    """The model here does not exist: before, the scale was checked only once the model had loaded."""
    lora = diffusers_lora(tmp_path / "l.safetensors", rng)
    code = cli.main(["generate", "--model", str(tmp_path / "no-model"), "--lora", f"{lora}:{scale}", "--steps", "1",
                     "--out", str(tmp_path / "o.png"), "a cat"])
    assert code == 2
    assert "LoRA scale must be finite" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("pattern", ["^(.*)*x", "^(a|a)+$", "^" + ".*" * 6 + "x", "^" + ".?" * 30 + "x"])
def test_alpha_patterns_that_backtrack_for_ages_are_refused(pipe, tmp_path, rng, pattern):
    """Before: "(.*)*x" matched against a module name of ~40 characters took minutes (x4 per 2 characters more:
    a hang), ".*" * 6 + "x" half a second per layer; refused now before any match."""
    before = all_weights(pipe)
    path = diffusers_lora(tmp_path / "slow.safetensors", rng, json.dumps({"unet.alpha_pattern": {pattern: 4}}))
    started = time.monotonic()
    with pytest.raises(NpdiffError, match="repeats a group .* or has more than 4 of"):
        pipe.load_lora_weights(path)
    assert time.monotonic() - started < 5
    assert_untouched(pipe, before)


def test_many_slow_alpha_patterns_are_cut_short(pipe, tmp_path, rng, monkeypatch):
    """Each allowed pattern matches in milliseconds, but thousands of them times every layer add up: refused
    once PATTERN_SECONDS have gone into them (lowered here to keep the test short)."""
    monkeypatch.setattr(npdiff_lora, "PATTERN_SECONDS", 0.2)
    patterns = {"^" + ".*" * 4 + f"x{index}": 4 for index in range(3000)}  # none matches: each backtracks fully
    path = diffusers_lora(tmp_path / "many.safetensors", rng, json.dumps({"unet.alpha_pattern": patterns}))
    before = all_weights(pipe)
    with pytest.raises(NpdiffError, match="alpha_pattern regexes .* took over 0.2 s"):
        pipe.load_lora_weights(path)
    assert_untouched(pipe, before)


@pytest.mark.parametrize("path", [None, 5, 2.5])
def test_a_lora_path_that_is_not_a_path_is_named(pipe, path):
    """Before: TypeError (expected str, bytes or os.PathLike object)."""
    with pytest.raises(NpdiffError, match=f"LoRA: expected the path of a .safetensors file, got {path}"):
        pipe.load_lora_weights(path)


# ---------------------------------------------------------------------------------------------------------------
# webui prompt syntax
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,weight", [("(x:1.2.3)", "1.2.3"), ("a (x:...) b", "..."), ("((x:.))", ".")])
def test_a_weight_that_is_not_a_number_is_named(prompt, weight):
    """webui's regex takes [.\\d]+ as a weight, and float() raised ValueError: an NpdiffError now (a subclass)."""
    with pytest.raises(NpdiffError, match=rf"prompt weight ':{re.escape(weight)}\)' at character \d+: "
                                          rf"{re.escape(repr(weight))} is not a number"):
        parse_prompt_attention(prompt)


def test_weights_that_parse_are_as_webui_reads_them():
    assert parse_prompt_attention("(x:1.5) [y] (z:-2)") == [["x", 1.5], [" ", 1.0], ["y", 1 / 1.1], [" ", 1.0],
                                                               ["z", -2.0]]
    assert parse_prompt_attention("(x:nan) (y:1e309)") == [["x:nan", 1.1], [" ", 1.0], ["y:1e309", 1.1]]  # text


def test_a_long_whitespace_run_parses_in_linear_time():
    r"""Before: webui's re.split(r"\s*\bBREAK\b\s*") retried the rest of a whitespace run at every position:
    6 s for 20,000 spaces, 25 s for 40,000 (hours for a 1 MB prompt)."""
    started = time.process_time()
    assert parse_prompt_attention("a" + " " * 40_000 + "b") == [["a" + " " * 40_000 + "b", 1.0]]
    assert time.process_time() - started < 1.0


def test_break_splits_as_webuis_regex_does(rng):
    webui_break = re.compile(r"\s*\bBREAK\b\s*", re.S)
    atoms = [" ", "  ", "\t", "\n", "\u3000", "\x1c", "\u00a0", "BREAK", "xBREAK", "BREAKx", "_BREAK", "a", ",", "."]
    for _ in range(20_000):
        text = "".join(rng.choice(atoms, size=int(rng.integers(0, 12))))
        assert prompt_parser.split_break(text) == webui_break.split(text), repr(text)


def overflowing_prompts(rng):
    depth = int(rng.integers(1000, 3000))  # 1.1 ** 932 > float32's largest
    return {"deep": "(" * depth + "cat" + ")" * depth,
            "unclosed": "a " + "(" * depth + "cat",
            "weight": f"a (cat:{int(rng.uniform(1.0, 3.3) * 1e38)}) on a mat",  # finite in float32; z * it is not
            "digits": "(cat:" + "9" * int(rng.integers(310, 500)) + ")"}


@pytest.mark.parametrize("case", ["deep", "unclosed", "weight", "digits"])
def test_weights_that_overflow_the_embeddings_are_refused(pipe, rng, case):
    """Before: NaN/Inf text embeddings returned, and sampled (a black or noise picture)."""
    prompt = overflowing_prompts(rng)[case]
    with pytest.raises(NpdiffError, match="emphasis weights .* make the text embeddings overflow float32"):
        pipe.encode_prompt(prompt, "", prompt_syntax="a1111")
    with pytest.raises(NpdiffError, match="overflow float32"):
        pipe.encode_prompt("a dog", prompt, prompt_syntax="a1111")  # the negative prompt too


def test_large_but_finite_emphasis_still_encodes(pipe, rng):
    depth = int(rng.integers(1, 200))
    for prompt in ["(" * depth + "cat" + ")" * depth, "(cat:1e30)", "[" * 2000 + "cat", "(cat:0) (dog:-3)"]:
        embeddings = np.asarray(pipe.encode_prompt(prompt, "", prompt_syntax="a1111")[0])
        assert np.isfinite(embeddings).all(), prompt


def test_an_embedding_of_more_than_75_vectors_is_named_in_a_prompt(folder, tmp_path, rng):
    """Before: "input_ids has length 83; the text encoder has max_position_embeddings 77" (webui's chunk)."""
    count = int(rng.integers(76, 120))
    path = tmp_path / "long.safetensors"
    save_file({"<long>": torch.from_numpy(rng.standard_normal((count, WIDTH)).astype(np.float32))}, str(path))
    ours = load_ours(folder)
    ours.load_textual_inversion(path)
    with pytest.raises(NpdiffError, match=rf"textual inversion word '<long>' has {count} vectors; a prompt chunk "
                                          "holds 75 tokens"):
        ours.encode_prompt("a (<long>:1.1) b", "", prompt_syntax="a1111")
    with pytest.warns(UserWarning, match="the last .* were dropped"):  # plain syntax: cut at 75 ids
        vectors = np.asarray(ours.encode_prompt("a <long> b", "")[0])
    assert np.isfinite(vectors).all()


# ---------------------------------------------------------------------------------------------------------------
# textual inversion (SDXL)
# ---------------------------------------------------------------------------------------------------------------
def test_sdxl_embedding_whose_halves_differ_in_vector_count_is_refused(tmp_path, rng):
    """Before: clip_l's 2 vectors went in as "w", "w_1" and clip_g's 1 as "w": a prompt's two token
    sequences no longer lined up."""
    counts = {"clip_l": 2, "clip_g": 1} if rng.random() < 0.5 else {"clip_l": 1, "clip_g": 3}
    widths = {"clip_l": CLIP_L["hidden_size"], "clip_g": CLIP_G["hidden_size"]}
    path = tmp_path / "mixed.safetensors"
    save_file({key: torch.from_numpy(rng.standard_normal((counts[key], widths[key])).astype(np.float32))
               for key in counts}, str(path))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder("base"))
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2), pipe.text_encoder.token_embedding.shape,
             pipe.text_encoder_2.token_embedding.shape)
    with pytest.raises(NpdiffError, match=rf"'clip_l' holds {counts['clip_l']} vectors and 'clip_g' "
                                          rf"{counts['clip_g']}"):
        pipe.load_textual_inversion(path, token="<mixed>")
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2), pipe.text_encoder.token_embedding.shape,
            pipe.text_encoder_2.token_embedding.shape) == sizes


@pytest.mark.parametrize("path", [None, 5])
def test_an_embedding_path_that_is_not_a_path_is_named(pipe, path):
    """Before: TypeError, in both SD's and SDXL's load_textual_inversion."""
    with pytest.raises(NpdiffError, match=f"textual inversion: expected the path of a .safetensors file, got {path}"):
        pipe.load_textual_inversion(path)
    xl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder("base"))
    with pytest.raises(NpdiffError, match="textual inversion: expected the path"):
        xl.load_textual_inversion(path)


def test_an_embedding_folder_is_named_as_a_folder(pipe, tmp_path):
    """Before: "textual inversion file DIR does not exist" for a folder that does (diffusers' learned_embeds
    folder, say)."""
    (tmp_path / "learned").mkdir()
    with pytest.raises(NpdiffError, match=r"learned is a folder; give the .safetensors file in it \(e.g. .*learned/"
                                          r"learned_embeds.safetensors\)"):
        pipe.load_textual_inversion(tmp_path / "learned")


def test_sdxl_embedding_into_one_encoder_with_the_other_tokenizer_is_refused(rng):
    """Before: added ("<m>" in tokenizer, its row in text_encoder_2), then every prompt with "<m>" failed with
    "input_ids must lie in [0, 49408)"."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder("base"))
    vectors = rng.standard_normal(CLIP_G["hidden_size"]).astype(np.float32)
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2), pipe.text_encoder_2.token_embedding.shape)
    with pytest.raises(NpdiffError, match=r"must belong together \(pipe.text_encoder(_2)? with pipe.tokenizer(_2)?\)"):
        pipe.load_textual_inversion(vectors, token="<m>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer)
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2), pipe.text_encoder_2.token_embedding.shape) == sizes
    assert pipe.load_textual_inversion(vectors, token="<m>", text_encoder=pipe.text_encoder_2,
                                       tokenizer=pipe.tokenizer_2) == ["<m>"]


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["a {} and a {0}", "a {} on {x}", "a {}{", "a {} in } c"])
def test_a_caption_template_str_format_cannot_fill_is_refused_up_front(template):
    """Before: counted one "{}" and passed; every step's template.format(token) raised ValueError/KeyError
    after the model had loaded and the pictures were encoded."""
    with pytest.raises(NpdiffError, match="is not a template with one '{}'"):
        check_templates([template])
    assert check_templates(["a {} with {{braces}}"]) == ("a {} with {{braces}}",)


@pytest.mark.parametrize("kind", ["embedding", "lora"])
def test_training_that_diverges_writes_no_nan_file(folder, tmp_path, rng, kind):
    """lr 1e30: before, 3 steps wrote embedding/LoRA files full of NaN (which load_textual_inversion and
    load_lora_weights then refuse as damaged) and reported success."""
    pictures = draw_pictures(tmp_path / "pictures", rng, count=2)
    out = tmp_path / "out.safetensors"
    ours = load_ours(folder)
    before = all_weights(ours)
    with pytest.raises(NpdiffError, match=r"training diverged at step \d: .*lower the learning rate \(1e\+30 now\)"):
        if kind == "embedding":
            textual_inversion(ours, pictures, "<d>", "toy", steps=4, lr=1e30, out=out, progress=False)
        else:
            train_lora(ours, pictures, prompt="a photo of sks", steps=4, lr=1e30, out=out, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pictures"]
    assert_untouched(ours, before)  # the UNet's weights as they were, the LoRA removed
    if kind == "embedding":  # the word stays, with the last finite rows
        assert np.isfinite(np.asarray(ours.text_encoder.token_embedding)).all()


@pytest.mark.parametrize("command", ["train-embedding", "train-lora"])
def test_train_out_ending_in_a_slash_is_refused(folder, tmp_path, rng, command):
    """Before: "--out DIR/x/" wrote a file named "x" (Path drops the slash) and its siblings beside it."""
    pictures = draw_pictures(tmp_path / "pictures", rng, count=1)
    extra = (["--token", "<s>", "--init-word", "toy"] if command == "train-embedding" else ["--prompt", "a sks"])
    code = cli.main([command, str(pictures), *extra, "--out", f"{tmp_path}/x/", "--model", str(folder), "--steps", "1",
                     "--quiet"])
    assert code == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pictures"]
    ours = load_ours(folder)
    with pytest.raises(NpdiffError, match="ends in a slash"):
        if command == "train-embedding":
            textual_inversion(ours, pictures, "<s>", "toy", steps=1, out=f"{tmp_path}/x/", progress=False)
        else:
            train_lora(ours, pictures, prompt="a sks", steps=1, out=f"{tmp_path}/x/", progress=False)


@pytest.mark.parametrize("alpha", ["inf", "nan", "0", "-1"])
def test_train_lora_alpha_is_checked_before_the_model_loads(tmp_path, rng, capsys, alpha):
    """The model does not exist: before, --alpha inf passed the command's check and met train_lora's only
    after the model had loaded."""
    pictures = draw_pictures(tmp_path / "pictures", rng, count=1)
    code = cli.main(["train-lora", str(pictures), "--prompt", "a sks", "--alpha", alpha, "--out",
                     str(tmp_path / "l.safetensors"), "--model", str(tmp_path / "no-model")])
    assert code == 2
    assert "--alpha must be a finite number > 0" in capsys.readouterr().err


def checkpoint_variants(good_settings, arrays):
    """name -> (settings text, arrays, words of the refusal): one damage each."""
    def floats(shape, value):
        return np.full(shape, value, np.float32)

    shape = arrays["vectors"].shape
    settings = json.dumps(good_settings)
    return {
        "not_json": ("{nope", arrays, "metadata is not JSON"),
        "json_list": ("[1, 2]", arrays, "metadata is a JSON list, not an object"),
        "huge_int": ('{"step": 1' + "0" * 5000 + "}", arrays, "metadata is not JSON"),  # past Python's int limit
        "no_step_count": (json.dumps({k: v for k, v in good_settings.items() if k != "step_count"}), arrays,
                          "step_count is None; expected an integer >= 0"),
        "step_text": (json.dumps(dict(good_settings, step="1")), arrays, "step is '1'; expected an integer >= 0"),
        "nan_vectors": (settings, dict(arrays, vectors=floats(shape, np.nan)), "'vectors' holds NaN or Inf"),
        "int_vectors": (settings, dict(arrays, vectors=np.zeros(shape, np.int32)), "'vectors' holds int32 values"),
        "negative_moment": (settings, dict(arrays, exp_avg_sq=floats(shape, -1.0)), "'exp_avg_sq' .* negative"),
        "losses_2d": (settings, dict(arrays, losses=np.zeros((1, 1))), r"'losses' has shape \(1, 1\)"),
    }


def test_a_damaged_checkpoint_is_named_before_training(folder, tmp_path, rng):
    """Before: JSONDecodeError, AttributeError, KeyError or ValueError tracebacks from --resume, or "training
    diverged" / "at step 2" for a checkpoint that held NaN or a 2-D loss list."""
    from safetensors import safe_open
    from safetensors.numpy import save_file as save_numpy

    pictures = draw_pictures(tmp_path / "pictures", rng, count=1)
    out = tmp_path / "w.safetensors"
    textual_inversion(load_ours(folder), pictures, "<w>", "toy", steps=1, checkpoint_every=1, out=out, progress=False)
    with safe_open(str(tmp_path / "w.checkpoint.safetensors"), framework="numpy") as handle:
        good_settings = json.loads(handle.metadata()["npdiff_training"])
        arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for name, (settings, damaged, words) in checkpoint_variants(good_settings, arrays).items():
        path = tmp_path / f"{name}.safetensors"
        save_numpy(damaged, str(path), metadata={"npdiff_training": settings})
        with pytest.raises(NpdiffError, match=rf"--resume .*{name}.safetensors: a damaged checkpoint: .*{words}"):
            textual_inversion(load_ours(folder), pictures, "<w>", "toy", steps=3, resume=path, progress=False)
    bf16 = tmp_path / "bf16.safetensors"
    save_file({key: torch.from_numpy(np.array(value)).to(torch.bfloat16) for key, value in arrays.items()}, str(bf16),
              metadata={"npdiff_training": json.dumps(good_settings)})
    with pytest.raises(NpdiffError, match="bf16.safetensors: not a readable .safetensors file"):
        textual_inversion(load_ours(folder), pictures, "<w>", "toy", steps=3, resume=bf16, progress=False)


@pytest.mark.parametrize("command", ["train-embedding", "train-lora"])
def test_a_negative_training_seed_is_refused_before_the_model_loads(tmp_path, rng, capsys, command):
    """The model does not exist: before, --seed -1 passed, and numpy's SeedSequence raised "expected non-negative
    integer" (a ValueError traceback) once the model had loaded."""
    pictures = draw_pictures(tmp_path / "pictures", rng, count=1)
    extra = (["--token", "<s>", "--init-word", "toy"] if command == "train-embedding" else ["--prompt", "a sks"])
    code = cli.main([command, str(pictures), *extra, "--seed", str(-int(rng.integers(1, 2**31))), "--out",
                     str(tmp_path / "o.safetensors"), "--model", str(tmp_path / "no-model")])
    assert code == 2
    assert "training seed must be an integer >= 0, got -" in capsys.readouterr().err


@pytest.mark.parametrize("bad_seed", [-1, 1.5, "3", True])
def test_training_functions_take_only_seeds_numpy_can(folder, tmp_path, rng, bad_seed):
    pictures = draw_pictures(tmp_path / "pictures", rng, count=1)
    ours = load_ours(folder)
    with pytest.raises(NpdiffError, match="training seed must be an integer >= 0"):
        textual_inversion(ours, pictures, "<s>", "toy", steps=1, seed=bad_seed, progress=False)
    with pytest.raises(NpdiffError, match="training seed must be an integer >= 0"):
        train_lora(ours, pictures, prompt="a sks", steps=1, seed=bad_seed, progress=False)
    assert train_lora(ours, pictures, prompt="a sks", steps=1, seed=np.int64(2**40), progress=False).losses


@pytest.mark.parametrize("command", ["train-embedding", "train-lora"])
def test_train_out_into_the_pictures_folder_is_refused(folder, tmp_path, rng, command):
    """Before: --out DIR/picture0.png replaced a training picture with the result (a .safetensors file named
    .png), and any --out in DIR left a loss plot .png there that the next run read as a training picture."""
    pictures = draw_pictures(tmp_path / "pictures", rng, count=2)
    before = {path.name: path.read_bytes() for path in pictures.iterdir()}
    extra = (["--token", "<s>", "--init-word", "toy"] if command == "train-embedding" else ["--prompt", "a sks"])
    for out in (pictures / "picture0.png", pictures / "result.safetensors"):
        code = cli.main([command, str(pictures), *extra, "--out", str(out), "--model", str(folder), "--steps", "1",
                         "--quiet"])
        assert code == 2
    assert {path.name: path.read_bytes() for path in pictures.iterdir()} == before
    with pytest.raises(NpdiffError, match="is in the training pictures' folder"):
        if command == "train-embedding":
            textual_inversion(load_ours(folder), pictures, "<s>", "toy", steps=1, out=pictures / "o.safetensors",
                              progress=False)
        else:
            train_lora(load_ours(folder), pictures, prompt="a sks", steps=1, out=pictures / "o.safetensors",
                       progress=False)


def test_train_out_over_the_model_file_is_refused(tmp_path, rng, capsys):
    """A single-file model given as --model and as --out: before, the model was replaced by the embedding."""
    pictures = draw_pictures(tmp_path / "pictures", rng, count=1)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"a model's bytes")  # never read: the refusal comes first
    code = cli.main(["train-embedding", str(pictures), "--token", "<s>", "--init-word", "toy", "--out", str(model),
                     "--model", str(model)])
    assert code == 2
    assert "is the model file" in capsys.readouterr().err
    assert model.read_bytes() == b"a model's bytes"


@pytest.mark.parametrize("over", ["--model", "--lora"])
def test_generate_out_over_the_model_or_a_lora_is_refused(tmp_path, rng, capsys, over):
    """Before: the picture was written over the single-file model or the LoRA named on the same command line
    (atomically, so the file was simply replaced by a PNG)."""
    lora = diffusers_lora(tmp_path / "style.safetensors", rng)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"a model's bytes")  # never read: the refusal comes first
    target = model if over == "--model" else lora
    before = target.read_bytes()
    code = cli.main(["generate", "--model", str(model), "--lora", f"{lora}:0.5", "--steps", "1", "--out", str(target),
                     "a cat"])
    assert code == 2
    assert f"--out {target} is the {over} file" in capsys.readouterr().err
    assert target.read_bytes() == before


def test_out_of_memory_in_training_names_the_batch_size(folder, tmp_path, rng, capsys, monkeypatch):
    """Before: "out of memory (...); lower --height/--width", options the training commands do not have."""
    from npdiff import cli_train

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 940. MiB")

    monkeypatch.setattr(cli_train, "textual_inversion", out_of_memory)
    pictures = draw_pictures(tmp_path / "pictures", rng, count=1)
    code = cli.main(["train-embedding", str(pictures), "--token", "<s>", "--init-word", "toy", "--batch-size", "8",
                     "--out", str(tmp_path / "o.safetensors"), "--model", str(folder)])
    assert code == 1
    assert capsys.readouterr().err.strip().endswith("out of memory (Unable to allocate 940. MiB); lower --batch-size")

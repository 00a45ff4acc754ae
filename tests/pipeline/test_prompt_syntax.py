"""prompt_syntax="a1111" against AUTOMATIC1111 webui's algorithm, written out here on its own over transformers'
CLIPTokenizer / CLIPTextModel / CLIPTextModelWithProjection and torch (webui's modules/prompt_parser.py and
modules/sd_hijack_clip.py: parse, 75-token chunks with the comma backtrack and BREAK, ids after the first end id
made the pad id, clip skip, the "Original" emphasis, chunks side by side, the shorter of cond/uncond padded with
the empty prompt's chunk): embeddings within relative 1e-4 for SD 1.x, SD 2.x ("!" padding) and SDXL, on prompts
with every syntax element and of several chunks; pictures within 2 levels of diffusers fed those embeddings."""

import doctest
import re

import pytest

from helpers import NETWORK_TOL, assert_rel_close

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from test_pipeline_txt2img import assert_same_pictures, to_levels  # noqa: E402
from tiny_sd import tiny_sd_folder, torch_pipeline  # noqa: E402
from tiny_sdxl import tiny_sdxl_folder, torch_sdxl_pipeline  # noqa: E402

import npdiff.prompt_parser  # noqa: E402
from npdiff import NpdiffError  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline  # noqa: E402
from npdiff.prompt_chunks import prompt_chunks  # noqa: E402
from npdiff.prompt_parser import parse_prompt_attention  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# webui's algorithm, written out for the test
# ---------------------------------------------------------------------------------------------------------
WEBUI_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
WEBUI_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def webui_parse(text):
    res, round_brackets, square_brackets = [], [], []

    def multiply_range(start, multiplier):
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in WEBUI_ATTENTION.finditer(text):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(WEBUI_BREAK, text)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def webui_tokenize_line(tokenizer, line):
    """-> [(tokens [77], multipliers [77])], tokens padded with the end id (webui's tokenize_line)."""
    parsed = webui_parse(line)
    tokenized = tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    id_start, id_end, comma = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.get_vocab()[",</w>"]
    chunks, chunk = [], [[], []]
    last_comma = -1

    def next_chunk():
        nonlocal chunk, last_comma
        to_add = 75 - len(chunk[0])
        chunk[0] += [id_end] * to_add
        chunk[1] += [1.0] * to_add
        chunks.append(([id_start] + chunk[0] + [id_end], [1.0] + chunk[1] + [1.0]))
        chunk, last_comma = [[], []], -1

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(chunk[0])
            elif len(chunk[0]) == 75 and last_comma != -1 and len(chunk[0]) - last_comma <= 20:
                reloc = [chunk[0][last_comma + 1:], chunk[1][last_comma + 1:]]
                chunk = [chunk[0][:last_comma + 1], chunk[1][:last_comma + 1]]
                next_chunk()
                chunk = reloc
            if len(chunk[0]) == 75:
                next_chunk()
            chunk[0].append(token)
            chunk[1].append(weight)
    if chunk[0] or not chunks:
        next_chunk()
    return chunks


def webui_process_tokens(model, tokens, multipliers, id_end, id_pad, clip_skip, layer):
    """One chunk of a batch: ids after the first end -> pad, encode, emphasis -> (z [B,77,D], pooled or None)."""
    tokens = torch.asarray(tokens)
    if id_end != id_pad:
        for row in range(tokens.shape[0]):
            index = tokens[row].tolist().index(id_end)
            tokens[row, index + 1:] = id_pad
    with torch.no_grad():
        outputs = model(input_ids=tokens, output_hidden_states=True)
        pooled = getattr(outputs, "text_embeds", None)
        if layer == "penultimate":  # SDXL, diffusers' clip skip
            z = outputs.hidden_states[-(clip_skip or 0) - 2]
        elif clip_skip:  # webui's CLIP_stop_at_last_layers = clip_skip + 1 > 1
            norm = getattr(model, "text_model", model).final_layer_norm  # transformers 5 has no text_model
            z = norm(outputs.hidden_states[-(clip_skip + 1)])
        else:
            z = outputs.last_hidden_state
    multipliers = torch.asarray(multipliers, dtype=torch.float32)
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean), pooled


def webui_encode(model, tokenizer, prompts, clip_skip=None, layer="last"):
    """webui's FrozenCLIPEmbedderWithCustomWords.forward -> (z [B,77*C,D], pooled of the first chunk)."""
    batch_chunks = [webui_tokenize_line(tokenizer, prompt) for prompt in prompts]
    empty = webui_tokenize_line(tokenizer, "")[0]
    zs, pooled = [], None
    for i in range(max(len(chunks) for chunks in batch_chunks)):
        batch_chunk = [chunks[i] if i < len(chunks) else empty for chunks in batch_chunks]
        z, chunk_pooled = webui_process_tokens(model, [c[0] for c in batch_chunk], [c[1] for c in batch_chunk],
                                               tokenizer.eos_token_id, tokenizer.pad_token_id, clip_skip, layer)
        zs.append(z)
        pooled = chunk_pooled if i == 0 else pooled
    return torch.hstack(zs), pooled


def webui_pad_cond_uncond(cond, uncond, empty):
    num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if num_repeats < 0:
        cond = torch.cat([cond, empty.repeat((cond.shape[0], -num_repeats, 1))], axis=1)
    elif num_repeats > 0:
        uncond = torch.cat([uncond, empty.repeat((uncond.shape[0], num_repeats, 1))], axis=1)
    return cond, uncond


class WebuiSD:
    """SD 1.x/2.x: one encoder."""

    def __init__(self, folder):
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        self.model = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()

    def encode(self, prompts, clip_skip):
        return webui_encode(self.model, self.tokenizer, prompts, clip_skip)[0], None

    def cond_uncond(self, prompts, negatives, clip_skip):
        cond, cond_pooled = self.encode(prompts, clip_skip)
        uncond, uncond_pooled = self.encode(negatives, clip_skip)
        cond, uncond = webui_pad_cond_uncond(cond, uncond, self.encode([""], clip_skip)[0])
        return cond, uncond, cond_pooled, uncond_pooled


class WebuiSDXL(WebuiSD):
    """SDXL: both encoders, each chunked and weighted on its own, side by side on the channels."""

    def __init__(self, folder):
        self.encoders = [(CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval(),
                          CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))),
                         (CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2")).eval(),
                          CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")))]

    def encode(self, prompts, clip_skip):
        (z1, _), (z2, pooled) = [webui_encode(model, tokenizer, prompts, clip_skip, "penultimate")
                                 for model, tokenizer in self.encoders]
        return torch.cat([z1, z2], axis=-1), pooled


# ---------------------------------------------------------------------------------------------------------
# Prompts with every syntax element, of one to several chunks
# ---------------------------------------------------------------------------------------------------------
WORDS = ["red", "green", "blue", "circle", "square", "sky", "house", "cat", "dog", "tree", "night", "photo",
         "watercolor", "detailed", "bright", "東京", "🐱", "masterpiece", "the", "on", "a"]
SYNTAX = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))). \\(not weighted\\) [[faded]] (unclosed, [open"


def random_phrase(rng, words):
    text = " ".join(rng.choice(WORDS, size=words))
    form = rng.integers(0, 5)
    return [text, f"({text})", f"[{text}]", f"({text}:{rng.uniform(0.3, 1.6):.2f})", f"(({text}))"][form]


def long_prompt(rng, phrases, commas=True):
    """Phrases of 1-4 words in random webui syntax, joined by commas (the backtrack then applies) or spaces."""
    return (", " if commas else " ").join(random_phrase(rng, int(rng.integers(1, 5))) for _ in range(phrases))


def prompt_cases(rng):
    return {
        "syntax": SYNTAX,
        "break": f"a red circle BREAK {SYNTAX} BREAK (blue square:1.4), [green] triangle",
        "long, commas": long_prompt(rng, 70),
        "long, no commas": long_prompt(rng, 60, commas=False),
        "long with BREAK": long_prompt(rng, 25) + " BREAK " + long_prompt(rng, 40),
        "empty": "",
    }


def test_parser_doctest():
    result = doctest.testmod(npdiff.prompt_parser)
    assert result.attempted >= 1 and result.failed == 0


def test_parser_equals_webui_on_random_syntax(rng):
    alphabet = ["(", ")", "[", "]", ":", ":1.2)", ": 0.5 )", "\\(", "\\)", "\\\\", "\\", " BREAK ", "BREAKS", "a",
                " cat ", ", ", "1.5"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 14))))
        assert parse_prompt_attention(text) == webui_parse(text), text
    assert parse_prompt_attention("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert parse_prompt_attention("\\(literal\\]") == [["(literal]", 1.0]]


@pytest.mark.parametrize("kind", ["test", "sd2"])
def test_chunks_equal_webui(rng, kind):
    from npdiff.tokenizer import CLIPTokenizer as OurTokenizer

    folder = tiny_sd_folder(kind=kind)
    ours_tokenizer = OurTokenizer.from_pretrained(folder, subfolder="tokenizer")
    theirs_tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    for what, prompt in prompt_cases(rng).items():
        theirs = webui_tokenize_line(theirs_tokenizer, prompt)
        for tokens, _ in theirs:  # ids after the first end id -> the pad id (process_tokens)
            first_end = tokens.index(theirs_tokenizer.eos_token_id)
            tokens[first_end + 1:] = [theirs_tokenizer.pad_token_id] * (76 - first_end)
        ours = prompt_chunks(ours_tokenizer, prompt)
        assert [c.ids for c in ours] == [t for t, _ in theirs], what
        assert [c.multipliers for c in ours] == [m for _, m in theirs], what
    # the cases reach what they are for: a comma backtrack (a chunk ended early), and hard 75-id cuts
    end = ours_tokenizer.eos_token_id
    # 60 one-token words, a comma, 30 more: the first chunk fills at 75 with its last comma 14 ids back, so the
    # 14 words after it move on and the chunk ends at the comma (a random prompt lands on a full chunk too often)
    backtracked = " ".join(["red"] * 60) + ", " + " ".join(["blue"] * 30)
    theirs = webui_tokenize_line(theirs_tokenizer, backtracked)
    with_commas = prompt_chunks(ours_tokenizer, backtracked)
    assert with_commas[0].ids.index(end) == 62 and len(with_commas) == 2
    assert [c.ids[:c.ids.index(end) + 1] for c in with_commas] == [t[:t.index(end) + 1] for t, _ in theirs]
    without_commas = prompt_chunks(ours_tokenizer, long_prompt(rng, 60, commas=False))
    assert len(without_commas) >= 2 and all(chunk.ids.index(end) == 76 for chunk in without_commas[:-1])


def test_multi_vector_embedding_not_split_across_chunks():
    """webui places a textual-inversion embedding's vectors in one chunk: 73 words, then a 3-vector token."""
    from npdiff.tokenizer import CLIPTokenizer as OurTokenizer

    tokenizer = OurTokenizer.from_pretrained(tiny_sd_folder(), subfolder="tokenizer")
    names = ["<cat>", "<cat>_1", "<cat>_2"]
    group = tokenizer.add_tokens(names)
    tokenizer.register_multi_vector("<cat>", names)
    red = tokenizer.encode("red")[0]
    first, second = prompt_chunks(tokenizer, "red " * 73 + "(<cat>:1.2) blue")
    assert first.ids[1:74] == [red] * 73 and first.ids[74] == tokenizer.eos_token_id
    assert second.ids[1:4] == group and second.multipliers[1:4] == [1.2] * 3
    assert prompt_chunks(tokenizer, "red " * 72 + "<cat>")[0].ids[73:76] == group  # fits: stays


def check_embeddings(ours, theirs, what):
    assert ours.shape == tuple(theirs.shape), f"{what}: {ours.shape} vs {tuple(theirs.shape)}"
    assert_rel_close(ours, theirs.numpy(), tol=NETWORK_TOL, what=what)


@pytest.mark.parametrize("kind", ["test", "sd2"])
@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sd_embeddings_equal_webui(rng, kind, clip_skip):
    folder = tiny_sd_folder(kind=kind)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    webui = WebuiSD(folder)
    cases = prompt_cases(rng)
    pairs = [(cases["syntax"], cases["long, commas"]), (cases["long, no commas"], ""),
             (cases["break"], cases["long with BREAK"]), (cases["empty"], cases["syntax"])]
    for prompt, negative in pairs:
        cond, uncond = pipe.encode_prompt(prompt, negative, clip_skip=clip_skip, prompt_syntax="a1111")
        theirs_cond, theirs_uncond, _, _ = webui.cond_uncond([prompt], [negative], clip_skip)
        check_embeddings(cond, theirs_cond, f"{kind} cond of {prompt[:30]!r}")
        check_embeddings(uncond, theirs_uncond, f"{kind} uncond of {negative[:30]!r}")
    # a batch of prompts of different chunk counts (the emphasis means over the whole batch, as webui's)
    prompts, negatives = [cases["syntax"], cases["long, commas"]], [cases["break"], "blurry"]
    cond, uncond = pipe.encode_prompt(prompts, negatives, clip_skip=clip_skip, prompt_syntax="a1111",
                                      num_images_per_prompt=2)
    theirs_cond, theirs_uncond, _, _ = webui.cond_uncond(prompts, negatives, clip_skip)
    check_embeddings(cond, theirs_cond.repeat_interleave(2, dim=0), f"{kind} batch cond")
    check_embeddings(uncond, theirs_uncond.repeat_interleave(2, dim=0), f"{kind} batch uncond")


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sdxl_embeddings_equal_webui(rng, clip_skip):
    folder = tiny_sdxl_folder("base")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    webui = WebuiSDXL(folder)
    cases = prompt_cases(rng)
    for prompt, negative in [(cases["long, commas"], cases["syntax"]), (cases["break"], "blurry"),
                             (cases["syntax"], cases["long with BREAK"])]:
        cond, uncond, pooled, negative_pooled = pipe.encode_prompt(prompt, negative_prompt=negative,
                                                                   clip_skip=clip_skip, prompt_syntax="a1111")
        theirs = webui.cond_uncond([prompt], [negative], clip_skip)
        for ours_part, theirs_part, what in zip((cond, uncond, pooled, negative_pooled), theirs,
                                                ("cond", "uncond", "pooled", "negative pooled")):
            check_embeddings(ours_part, theirs_part, f"SDXL {what} of {prompt[:30]!r}")


@pytest.mark.parametrize("kind", ["test", "sd2"])
def test_sd_picture_equals_diffusers_fed_webui_embeddings(rng, seed, kind):
    folder = tiny_sd_folder(kind=kind)
    cases = prompt_cases(rng)
    prompt, negative = cases["break"], cases["long, commas"]
    cond, uncond, _, _ = WebuiSD(folder).cond_uncond([prompt], [negative], 1)
    theirs = torch_pipeline(folder, "euler")(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=4,
                                             generator=torch.Generator().manual_seed(seed), output_type="np").images
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler")
    pipe.show_progress = False
    ours = pipe(prompt, negative_prompt=negative, num_inference_steps=4, seed=seed, output_type="np",
                clip_skip=1, prompt_syntax="a1111")
    assert_same_pictures(ours.images, to_levels(theirs))
    assert ours.parameters["prompt_syntax"] == "a1111" and ours.parameters["clip_skip"] == 1


def test_sd_img2img_and_inpaint_equal_diffusers_fed_webui_embeddings(rng, seed):
    from sdxl_compare import random_mask, random_picture

    folder = tiny_sd_folder()
    cases = prompt_cases(rng)
    prompt, negative = cases["long with BREAK"], cases["syntax"]
    cond, uncond, _, _ = WebuiSD(folder).cond_uncond([prompt], [negative], 1)
    picture, mask = random_picture(rng), random_mask(rng)
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler")
    pipe.show_progress = False
    common = dict(num_inference_steps=4, output_type="np")
    for mode, extra in (("img2img", dict(image=picture, strength=0.7)),
                        ("inpaint", dict(image=picture, mask_image=mask))):
        theirs_pipe = torch_pipeline(folder, "euler", img2img=mode == "img2img", inpaint=mode == "inpaint")
        theirs = theirs_pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, **extra, **common,
                             generator=torch.Generator().manual_seed(seed)).images
        ours = getattr(pipe, mode)(prompt, negative_prompt=negative, seed=seed, clip_skip=1, prompt_syntax="a1111",
                                   **extra, **common)
        assert_same_pictures(ours.images, to_levels(theirs))
        assert ours.parameters["prompt_syntax"] == "a1111" and ours.parameters["clip_skip"] == 1


def test_sdxl_picture_equals_diffusers_fed_webui_embeddings(rng, seed):
    folder = tiny_sdxl_folder("base")
    cases = prompt_cases(rng)
    prompt, negative = cases["long, commas"], cases["syntax"]
    cond, uncond, pooled, negative_pooled = WebuiSDXL(folder).cond_uncond([prompt], [negative], None)
    theirs = torch_sdxl_pipeline(folder)(prompt_embeds=cond, negative_prompt_embeds=uncond,
                                         pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
                                         num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                                         output_type="np").images
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.show_progress = False
    ours = pipe(prompt, negative_prompt=negative, num_inference_steps=4, seed=seed, output_type="np",
                prompt_syntax="a1111")
    assert_same_pictures(ours.images, to_levels(theirs))
    assert ours.parameters["prompt_syntax"] == "a1111" and "clip_skip" not in ours.parameters


def test_bad_options_refused():
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder())
    for clip_skip in (-1, 1.5, True, "2", 3):  # the tiny text encoder has 2 layers
        with pytest.raises(NpdiffError, match="clip_skip"):
            pipe.encode_prompt("a cat", clip_skip=clip_skip)
    with pytest.raises(NpdiffError, match="prompt_syntax"):
        pipe("a cat", prompt_syntax="comfy", num_inference_steps=1)

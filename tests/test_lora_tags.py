"""webui's <lora:...> prompt tags as webui's Lora extension reads them: <lora:NAME> (scale 1), <lora:NAME:S>,
<lora:NAME:TE:UNET> and te=/unet= by name (npdiff fuses one scale, so the two must agree), dyn= refused. Read the
same way from a PNG's infotext (--reproduce, serve's png-info) and from the server's prompt; a tag npdiff cannot
follow is an error naming it, never a LoRA silently left out (before, <lora:NAME> and <lora:NAME:TE:UNET> stayed
in the prompt as words and no LoRA was loaded)."""

import pytest

from npdiff.errors import NpdiffError
from npdiff.infotext import lora_tag, parse_infotext
from npdiff.serve_schemas import RequestError, prompt_loras


def scale(rng):
    return round(float(rng.uniform(0.1, 1.5)), 3)


def test_webui_forms_that_name_one_scale(rng):
    s = scale(rng)
    assert lora_tag("shapes") == ("shapes", 1.0)
    assert lora_tag(f"shapes:{s}") == ("shapes", s)
    assert lora_tag(f"shapes:{s}:{s}") == ("shapes", s)
    assert lora_tag(f"shapes:te={s}:unet={s}") == ("shapes", s)
    assert lora_tag(f"shapes:{s}:unet={s}") == ("shapes", s)
    assert lora_tag("my lora v2:1") == ("my lora v2", 1.0)


@pytest.mark.parametrize("arguments, message", [
    ("shapes:0.8:0.5", "one scale for the text encoder and the UNet; give one (<lora:shapes:0.5>)"),
    ("shapes:unet=0.7", "one scale"),  # te is 1 when left out, as in webui
    ("shapes:1:1:8", "dyn"),
    ("shapes:dyn=8", "dyn"),
    ("shapes:x", "the scale 'x' is not a number"),
    ("shapes:1e309", "finite"),
    ("shapes:nan", "finite"),
    (":1", "no name"),
    ("shapes:strength=1", "unknown setting 'strength'"),
    ("shapes:1:1:1:1", "at most three settings"),
])
def test_tags_npdiff_cannot_follow_are_named(arguments, message):
    with pytest.raises(NpdiffError, match=r"<lora:") as refusal:
        lora_tag(arguments)
    assert message in str(refusal.value)


def test_infotext_and_server_read_the_same_tags(rng):
    s = scale(rng)
    text = f"a red square <lora:shapes> on blue <lora:ink:{s}:{s}>\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1"
    params = parse_infotext(text)
    assert params["prompt"] == "a red square  on blue"
    assert [(lora["name"], lora["scale"]) for lora in params["loras"]] == [("shapes", 1.0), ("ink", s)]
    assert prompt_loras(f"a red square <lora:shapes> on blue <lora:ink:{s}:{s}>") == (
        "a red square on blue", [("shapes", 1.0), ("ink", s)])
    with pytest.raises(NpdiffError, match="one scale"):
        parse_infotext("a square <lora:shapes:1:0.5>\nSteps: 20, Seed: 1")
    with pytest.raises(RequestError) as refusal:
        prompt_loras("a square <lora:shapes:1:0.5>")
    assert refusal.value.status == 422 and refusal.value.field == "prompt"
    with pytest.raises(RequestError) as refusal:
        prompt_loras("a square <lora:../x>")  # a path, not a name: still the server's 400
    assert refusal.value.status == 400

"""What the LoRA tests share: npdiff's tiny pipeline, its layers' weights by name, and the check that a
refused load replaced none of them."""

from npdiff import lora as npdiff_lora
from npdiff.pipeline import StableDiffusionPipeline


def load_ours(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler")
    pipe.show_progress = False
    return pipe


def all_weights(pipe):
    """{module name: weight array} of every UNet and text-encoder layer (their names never collide)."""
    layers = {**npdiff_lora.named_layers(pipe.unet, "unet"),
              **npdiff_lora.named_layers(pipe.text_encoder, "text_encoder")}
    return {name: layer.weight for name, layer in layers.items()}


def assert_untouched(pipe, before):
    """Every layer holds the very array it held in `before` (all_weights' result)."""
    after = all_weights(pipe)
    assert after.keys() == before.keys()
    changed = [name for name in before if after[name] is not before[name]]
    assert not changed, f"weights replaced: {changed[:3]}"

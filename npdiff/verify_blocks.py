"""The pieces `npdiff verify` compares with: recorders of block outputs on both sides, the error table,
the per-block comparison and the VAE's (the same for SD 1.x/2.x and SDXL: verify.py and verify_sdxl.py
use them). Needs torch only in the functions that are handed it.
"""

import importlib.util
import math

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.picture_size import check_size, size_rule

NETWORK_TOL = 1e-4
IMAGE_LEVELS_TOL = 2
# precision="bf16" against torch float32: bfloat16 keeps 8 bits of mantissa, so a network differs by ~1e-2
# (the goal: <= 3e-2; OpenVINO bf16 measures 2.2e-2). A sampling loop feeds each step's error into
# the next (the shipped model, 4 DDIM steps: final latents 3.2e-2, the picture up to 24 levels apart, its
# colours unchanged): at bf16 the sampling rows are printed, not judged (None).
BF16_NETWORK_TOL = 3e-2
TOLERANCES = {"fp32": (NETWORK_TOL, IMAGE_LEVELS_TOL), "bf16": (BF16_NETWORK_TOL, None),
              "bf16x3": (NETWORK_TOL, IMAGE_LEVELS_TOL),  # bf16x3: float32's accuracy (matmul_bf16x3.py)
              "mixed": (BF16_NETWORK_TOL, None)}  # mixed: a UNet part bf16 (models/precision.py), judged as bf16
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "watercolor, ÉCOLE 東京 🐱 (detail:1.2)!"]


# ---------------------------------------------------------------------------------------------
# Catching intermediate outputs
# ---------------------------------------------------------------------------------------------
def _first(output):
    """A block's main output: down blocks return (hidden_states, skips)."""
    return output[0] if isinstance(output, tuple) else output


class _Recorder:
    """Wraps an npdiff block: calls it, keeps its main output under `name`, forwards attribute reads."""

    def __init__(self, inner, name, store):
        self._inner, self._name, self._store = inner, name, store

    def __call__(self, *args, **kwargs):
        output = self._inner(*args, **kwargs)
        self._store[self._name] = backend.to_numpy(_first(output))
        return output

    def __getattr__(self, attribute):
        return getattr(self._inner, attribute)


def _locate(root, dotted):
    """'down_blocks.1' -> (container, key) such that container[key] / getattr(container, key) is the block."""
    parts = dotted.split(".")
    parent = root
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, (list, tuple)) else getattr(parent, part, None)
        if parent is None:
            return None
    last = parts[-1]
    if isinstance(parent, list):
        return (parent, int(last)) if int(last) < len(parent) else None
    return (parent, last) if getattr(parent, last, None) is not None else None


def trace_npdiff(root, names, store):
    """Wrap the named blocks of an npdiff model; -> (names found, a function that unwraps them)."""
    wrapped = []
    for name in names:
        where = _locate(root, name)
        if where is None:
            continue
        container, key = where
        if isinstance(container, list):
            original = container[key]
            container[key] = _Recorder(original, name, store)
        else:
            original = getattr(container, key)
            setattr(container, key, _Recorder(original, name, store))
        wrapped.append((container, key, original, name))

    def restore():
        for container, key, original, _ in wrapped:
            if isinstance(container, list):
                container[key] = original
            else:
                setattr(container, key, original)

    return [w[3] for w in wrapped], restore


def trace_torch(module, names, store):
    """Forward hooks on the named torch submodules; -> a function that removes them."""
    handles = []
    for name in names:
        sub = module.get_submodule(name)
        handles.append(sub.register_forward_hook(
            lambda _m, _i, out, name=name: store.__setitem__(name, _first(out).detach().float().numpy())))
    return lambda: [h.remove() for h in handles]


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
class Table:
    """Rows of relative errors against torch float32, each within the precision's tolerance (TOLERANCES)."""

    def __init__(self, out, precision="fp32"):
        self.out, self.rows, self.failures = out, [], 0
        self.tol, self.levels = TOLERANCES[precision]

    def add(self, component, part, ours, theirs, tol=None):
        tol = self.tol if tol is None else tol
        if ours is None:
            self.rows.append((component, part, "-", "-", "-", "not exposed by npdiff"))
            return
        ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
        if ours.shape != theirs.shape:
            self.failures += 1
            self.rows.append((component, part, str(theirs.shape), "-", "-", f"SHAPE {ours.shape}"))
            return
        denom = np.linalg.norm(theirs)
        rel = float(np.linalg.norm(ours - theirs) / (denom if denom > 0 else 1.0))
        max_abs = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
        ok = np.isfinite(rel) and rel <= tol
        self.failures += 0 if ok else 1
        self.rows.append((component, part, "x".join(map(str, theirs.shape)), f"{rel:.2e}", f"{max_abs:.2e}",
                          ("ok" if math.isfinite(tol) else "printed only") if ok else f"ABOVE {tol:.0e}"))

    def note(self, component, part, text, ok=True):
        self.failures += 0 if ok else 1
        self.rows.append((component, part, "-", "-", "-", text))

    def finish(self):
        """Print the table and the verdict -> 0 if every row is within tolerance, else 1."""
        self.print()
        verdict = "all within tolerance" if self.failures == 0 else f"{self.failures} rows outside tolerance"
        pictures = "not judged at bf16" if self.levels is None else f"<= {self.levels}"
        print(f"\n{verdict} (networks: relative error <= {self.tol:.0e}; pictures: {pictures} "
              "levels)", file=self.out)
        return 0 if self.failures == 0 else 1

    def print(self):
        header = ("component", "part", "shape", "rel err", "max |diff|", "")
        widths = [max(len(str(r[i])) for r in [header, *self.rows]) for i in range(6)]
        for row in [header, tuple("-" * w for w in widths), *self.rows]:
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip(), file=self.out)


# ---------------------------------------------------------------------------------------------
# Comparisons shared by SD and SDXL
# ---------------------------------------------------------------------------------------------
def require_torch_stack():
    missing = [name for name in ("torch", "diffusers", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise NpdiffError(f"npdiff verify compares against PyTorch and needs {', '.join(missing)}, which "
                          "is not installed: pip install -e '.[test]' (torch, diffusers, transformers)")


def picture_size(unet_config, vae_scale_factor, height, width):
    """The picture size to compare at (the UNet's sample_size when not given: None, never 0), checked -> (height,
    width, (latent height, latent width))."""
    side = unet_config["sample_size"] * vae_scale_factor
    height, width = check_size(side if height is None else height, side if width is None else width,
                               *size_rule(unet_config, vae_scale_factor))
    return height, width, (height // vae_scale_factor, width // vae_scale_factor)


def is_sdxl_folder(folder):
    """A diffusers folder of an SDXL pipeline: it has text_encoder_2/ (the refiner has only that encoder)."""
    return (folder / "text_encoder_2").is_dir()


def unet_block_names(torch_unet):
    names = ["time_embedding", "conv_in"]
    names += [f"down_blocks.{i}" for i in range(len(torch_unet.down_blocks))]
    names += ["mid_block"] if torch_unet.mid_block is not None else []
    names += [f"up_blocks.{i}" for i in range(len(torch_unet.up_blocks))]
    return names


def compare_blocks(table, component, ours_model, torch_model, names, run_ours, run_theirs):
    ours_store, theirs_store = {}, {}
    found, restore = trace_npdiff(ours_model, names, ours_store)
    remove = trace_torch(torch_model, names, theirs_store)
    try:
        ours_out, theirs_out = run_ours(), run_theirs()
    finally:
        restore()
        remove()
    for name in names:
        ours = ours_store.get(name) if name in found else None
        table.add(component, name, ours, theirs_store[name])
    return ours_out, theirs_out


def compare_vae(table, pipe, torch_pipe, latent_hw, generator, torch):
    factor = pipe.vae_scale_factor
    image = np.tanh(generator.randn((1, 3, latent_hw[0] * factor, latent_hw[1] * factor), dtype=np.float32))
    latents = generator.randn((1, pipe.vae.config["latent_channels"], *latent_hw), dtype=np.float32)
    vae = torch_pipe.vae
    encoder_names = ["encoder.conv_in"] + [f"encoder.down_blocks.{i}" for i in range(len(vae.encoder.down_blocks))]
    encoder_names += ["encoder.mid_block"]
    decoder_names = ["decoder.conv_in", "decoder.mid_block"]
    decoder_names += [f"decoder.up_blocks.{i}" for i in range(len(vae.decoder.up_blocks))]
    with torch.no_grad():
        ours, theirs = compare_blocks(
            table, "vae", pipe.vae, vae, encoder_names,
            lambda: backend.to_numpy(pipe.vae.encode(backend.to_device(image)).mean),
            lambda: vae.encode(torch.from_numpy(image)).latent_dist.mean.numpy())
        table.add("vae", "encode: posterior mean", ours, theirs)
        ours, theirs = compare_blocks(
            table, "vae", pipe.vae, vae, decoder_names,
            lambda: backend.to_numpy(pipe.vae.decode(backend.to_device(latents))),
            lambda: vae.decode(torch.from_numpy(latents)).sample.numpy())
        table.add("vae", "decode: picture", ours, theirs)


def compare_sampling(table, pipe, torch_pipe, steps, height, width, seed, torch):
    final = {}

    def keep_latents(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"].detach().numpy()
        return {}

    generator = torch.Generator().manual_seed(seed)
    theirs = torch_pipe(PROMPTS[0], num_inference_steps=steps, height=height, width=width, generator=generator,
                        output_type="np", callback_on_step_end=keep_latents)
    ours = pipe(PROMPTS[0], num_inference_steps=steps, height=height, width=width, seed=seed, output_type="np")
    name = f"{steps} steps {pipe.scheduler_name}, seed {seed}"
    judged = table.levels is not None  # bf16: printed only (TOLERANCES)
    table.add("sampling", f"{name}: final latents", ours.latents, final["latents"], None if judged else math.inf)
    ours_levels = np.round(ours.images * 255).astype(np.int16)
    theirs_levels = np.round(np.asarray(theirs.images) * 255).astype(np.int16)
    worst = int(np.max(np.abs(ours_levels - theirs_levels)))
    allowed = f"allowed {table.levels}" if judged else "not judged at bf16"
    table.note("sampling", f"{name}: 8-bit picture", f"max difference {worst} levels ({allowed})",
               ok=not judged or worst <= table.levels)

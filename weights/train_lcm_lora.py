"""Distil weights/tiny-shapes into an LCM-LoRA: good pictures in 2-8 steps without guidance.

    python weights/train_lcm_lora.py      # writes weights/tiny-shapes/lcm-lora.safetensors (kohya layout)

(42 min on one thread of a shared 2-core CPU; weights/README.md, "Few steps: the LCM-LoRA", has the run.)

Latent consistency distillation, as the LCM-LoRA paper (Luo et al. 2023) and diffusers'
examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py do it, compactly:
  - teacher: the frozen shipped UNet with classifier-free guidance at a scale g drawn per picture from
    [--guidance-min, --guidance-max] ("" is the unconditional prompt, as the model was trained);
  - ODE solver: one DDIM step of --skip timesteps (1000/50 = 20) from t_n = 20 (n+1) - 1 to t_n - 20;
  - student: the same UNet + a LoRA on the attention, feed-forward and projection layers and the ResNet
    convolutions (LoCon); it has no guidance input (LCM-LoRA), so it learns the guided ODE directly;
  - target: the student itself on the DDIM step's result, without gradient (the LoRA script's choice:
    no EMA copy of the UNet);
  - consistency function f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t), with the boundary scalings of
    the LCM scheduler (sigma_data 0.5, timestep_scaling 10);
  - loss: pseudo-Huber (c = 0.001) between f_student(x_tn, t_n) and f_target(x_prev, t_n - 20).
Pictures are drawn on the fly (weights/shapes_data.py, seed 10_000 + step, one of the five whole-picture
captions each) and encoded by the shipped VAE (a latent sample, times the folder's scaling factor).

The LoRA is saved in the kohya layout (lora_unet_<module path with _>.lora_down.weight / .lora_up.weight /
.alpha), which npdiff's and diffusers' load_lora_weights both read. Every --save-every steps the file is
rewritten and --work keeps the resumable state (--resume) and the loss log (log.json).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import shapes_data  # noqa: E402
from train import append_log, cosine_lr, images_to_tensor  # noqa: E402

# The layers the LoRA changes, by the last part of their module name (as the LCM-LoRA script's list):
# attention, feed-forward, transformer projections, and (LoCon) the ResNet convolutions and time
# projections, the down/up-sampling convolutions.
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


class DDIMSolver:
    """One DDIM step of `skip` training timesteps on the grid t_n = skip (n+1) - 1, n = 0..N-1."""

    def __init__(self, alphas_cumprod, skip):
        self.timesteps = torch.arange(skip - 1, len(alphas_cumprod), skip)  # [N]: 19, 39, ..., 999
        self.alpha_bar = alphas_cumprod[self.timesteps]  # [N]
        # the step from t_n lands on t_n - skip = t_(n-1); from t_0 on 0 (alphas_cumprod[0], as diffusers)
        self.alpha_bar_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])  # [N]

    def step(self, x0, eps, index):
        """x0, eps [B,4,8,8], index [B] -> x at t_n - skip: sqrt(a') x0 + sqrt(1 - a') eps."""
        alpha_bar_prev = self.alpha_bar_prev[index].view(-1, 1, 1, 1)
        return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps


def boundary_scalings(timesteps, sigma_data=0.5, timestep_scaling=10.0):
    """c_skip, c_out [B,1,1,1] of the consistency function (diffusers' LCMScheduler uses the same)."""
    scaled = timestep_scaling * timesteps.float()
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def predicted_x0(eps, x, alpha_bar):
    """epsilon prediction -> x0: (x - sqrt(1 - a) eps) / sqrt(a); alpha_bar [B,1,1,1]."""
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def kohya_state_dict(unet, rank, alpha):
    """The PEFT LoRA of `unet` -> {kohya key: float32 tensor}: lora_A -> lora_down, lora_B -> lora_up."""
    from peft.utils import get_peft_model_state_dict
    state = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, part = key.rsplit(".lora_", 1)  # "down_blocks.0...to_q", "A.weight"
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value.detach().float().contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def save_lora(unet, args, path):
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    save_file(kohya_state_dict(unet, args.rank, args.alpha), str(temporary),
              metadata={"ss_network_dim": str(args.rank), "ss_network_alpha": str(args.alpha),
                        "npdiff_training": "latent consistency distillation of tiny-shapes (weights/train_lcm_lora.py)"})
    temporary.chmod(0o644)  # readable by all once installed in a package
    temporary.replace(path)  # a reader never sees a half-written file


def load_models(model, device):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    model = Path(model)
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder", torch_dtype=torch.float32).to(device)
    vae = AutoencoderKL.from_pretrained(model / "vae").to(device)
    unet = UNet2DConditionModel.from_pretrained(model / "unet").to(device)
    alphas_cumprod = DDPMScheduler.from_pretrained(model / "scheduler").alphas_cumprod.to(device)
    for part in (text_encoder, vae, unet):
        part.eval().requires_grad_(False)
    return tokenizer, text_encoder, vae, unet, alphas_cumprod


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(HERE / "tiny-shapes"))
    parser.add_argument("--out", default=str(HERE / "tiny-shapes" / "lcm-lora.safetensors"))
    parser.add_argument("--work", default="/tmp/lcmlora-work", help="logs and resumable state")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--guidance-min", type=float, default=3.0)
    parser.add_argument("--guidance-max", type=float, default=8.0)
    parser.add_argument("--skip", type=int, default=20, help="training timesteps per DDIM solver step")
    parser.add_argument("--huber-c", type=float, default=0.001)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from peft import LoraConfig
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # 1. Frozen parts, the LoRA on the UNet (PEFT; B starts at zero: the student starts as the teacher).
    tokenizer, text_encoder, vae, unet, alphas_cumprod = load_models(args.model, device)
    scaling_factor = vae.config.scaling_factor
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGET_MODULES,
                                init_lora_weights="gaussian"))
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.lr, weight_decay=0.0)
    solver = DDIMSolver(alphas_cumprod, args.skip)
    first_step = 0
    if args.resume and (work / "state.pt").exists():
        state = torch.load(work / "state.pt", map_location=device)
        for parameter, saved in zip(lora_parameters, state["lora"]):
            parameter.data.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        first_step = state["step"]
        print(f"resumed at step {first_step}", flush=True)
    print(f"LoRA rank {args.rank}: {sum(p.numel() for p in lora_parameters):,} parameters in "
          f"{len(lora_parameters) // 2} layers", flush=True)

    @torch.no_grad()
    def encode_prompts(prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids.to(device)).last_hidden_state  # [B,77] -> [B,77,64]

    uncond_embeds = encode_prompts([""])  # [1,77,64]

    def eps(x, timesteps, embeds):
        return unet(x, timesteps, embeds).sample  # [B,4,8,8]

    start, running = time.time(), []
    for step in range(first_step, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, args.warmup)
        # 2. A fresh batch: pictures, one whole-picture caption each, latents from the shipped VAE.
        rng = np.random.default_rng(10_000 + step)
        images, captions, _ = shapes_data.make_dataset(args.batch, seed=10_000 + step)
        prompts = [variants[rng.integers(shapes_data.FULL_CAPTIONS)] for variants in captions]
        with torch.no_grad():
            latents = vae.encode(images_to_tensor(images, device)).latent_dist.sample() * scaling_factor
        embeds = encode_prompts(prompts)  # [B,77,64]
        batch = len(latents)

        # 3. x at a grid timestep t_n, and the guidance scale of this picture's teacher.
        index = torch.randint(0, len(solver.timesteps), (batch,), device=device)
        start_t = solver.timesteps.to(device)[index]  # [B]
        prev_t = (start_t - args.skip).clamp(min=0)  # [B]
        alpha_bar = solver.alpha_bar.to(device)[index].view(-1, 1, 1, 1)
        noise = torch.randn_like(latents)
        x_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise  # [B,4,8,8]
        guidance = args.guidance_min + (args.guidance_max - args.guidance_min) * torch.rand(batch, device=device)
        guidance = guidance.view(-1, 1, 1, 1)

        # 4. Student: f(x_t, t_n) with the LoRA, with gradient.
        c_skip, c_out = boundary_scalings(start_t)
        student = c_skip * x_t + c_out * predicted_x0(eps(x_t, start_t, embeds), x_t, alpha_bar)

        with torch.no_grad():
            # 5. Teacher (LoRA off): guided x0 and eps at t_n, one DDIM step to t_n - skip.
            unet.disable_adapters()
            both = eps(torch.cat([x_t, x_t]), torch.cat([start_t, start_t]),
                       torch.cat([embeds, uncond_embeds.expand(batch, -1, -1)]))  # [2B,4,8,8]
            unet.enable_adapters()
            cond_eps, uncond_eps = both.chunk(2)
            guided_eps = uncond_eps + guidance * (cond_eps - uncond_eps)
            guided_x0 = predicted_x0(guided_eps, x_t, alpha_bar)
            x_prev = solver.step(guided_x0, guided_eps, index)  # [B,4,8,8]

            # 6. Target: the student at (x_prev, t_n - skip), without gradient.
            alpha_bar_prev = alphas_cumprod[prev_t].view(-1, 1, 1, 1)
            c_skip_prev, c_out_prev = boundary_scalings(prev_t)
            target = c_skip_prev * x_prev + c_out_prev * predicted_x0(eps(x_prev, prev_t, embeds), x_prev,
                                                                      alpha_bar_prev)

        # 7. Pseudo-Huber loss, one optimiser step on the LoRA.
        loss = (torch.sqrt((student.float() - target.float()) ** 2 + args.huber_c ** 2) - args.huber_c).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_parameters, 1.0)
        optimizer.step()
        running.append(loss.item())

        if (step + 1) % 10 == 0:
            elapsed = time.time() - start
            print(f"step {step + 1} loss {np.mean(running):.5f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{elapsed / (step + 1 - first_step):.2f} s/step", flush=True)
            append_log(work, dict(stage="lcm", step=step + 1, loss=float(np.mean(running)), seconds=elapsed))
            running = []
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_lora(unet, args, out)
            torch.save(dict(lora=[p.detach().clone() for p in lora_parameters], optimizer=optimizer.state_dict(),
                            rng=torch.get_rng_state(), step=step + 1), work / "state.pt")
            print(f"saved {out} at step {step + 1}", flush=True)
    print(f"done: {args.steps - first_step} steps in {(time.time() - start) / 60:.1f} min on {device}", flush=True)


if __name__ == "__main__":
    main()

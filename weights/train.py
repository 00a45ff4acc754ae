"""Train weights/tiny-shapes: the VAE first, then the text encoder and UNet together.

    python weights/train.py        # both stages: rewrites weights/tiny-shapes (~65 min on 2 free CPU cores)

Stage 1, VAE: pictures drawn on the fly (weights/shapes_data.py, seed 1000+step), loss = L1 + MSE of the
reconstruction + 1e-6 x KL (summed over the latent, as SD's VAE recipe weighs it), AdamW with warm-up.
Stage 2, diffusion: a fixed set of pictures (seed 1) is encoded once by the frozen VAE (mean and std of
each latent are cached; a fresh latent sample is drawn per step), the latents are scaled by
1/std(latents) (stored as vae.config.scaling_factor, SD's 0.18215 plays the same role), and the text
encoder and UNet learn SD's epsilon-prediction objective on SD's noise schedule (scaled_linear, 1000 steps,
beta 0.00085..0.012). 10% of captions are replaced by "" so that classifier-free guidance works.
An EMA of the weights is what gets saved.

Fixed seeds throughout; runs on a GPU when there is one, otherwise on the CPU with --threads threads
(2 by default; use 1 on a shared, oversubscribed CPU). Every
--save-every steps the folder --out is rewritten (a partial run is usable) and --work holds the
resumable state and the loss log (log.json, plotted by `python weights/evaluate.py plot`).
"""

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes_data  # noqa: E402
import tiny_config  # noqa: E402


def cosine_lr(step, total, peak, warmup):
    """Linear warm-up to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def images_to_tensor(images_uint8, device):
    """uint8 [N,H,W,3] -> float32 [N,3,H,W] in [-1, 1] (SD's VAE input range)."""
    x = torch.from_numpy(images_uint8).to(device).permute(0, 3, 1, 2).float()  # [N,H,W,3] -> [N,3,H,W]
    return x / 127.5 - 1.0


def append_log(work, record):
    path = work / "log.json"
    log = json.loads(path.read_text()) if path.exists() else []
    log.append(record)
    path.write_text(json.dumps(log))


def train_vae(args, device, work):
    torch.manual_seed(0)
    vae = tiny_config.build_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = time.time()
    running = []
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.vae_schedule_steps or args.vae_steps, args.vae_lr, 50)
        images, _, _ = shapes_data.make_dataset(args.vae_batch, seed=1000 + step)
        x = images_to_tensor(images, device)  # [B,3,32,32]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample  # [B,4,8,8] -> [B,3,32,32]
        mse = (reconstruction - x).pow(2).mean()
        l1 = (reconstruction - x).abs().mean()
        kl = posterior.kl().mean()  # summed over the latent, mean over the batch
        loss = l1 + mse + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        running.append((mse.item(), kl.item()))
        if (step + 1) % 25 == 0 or step + 1 == args.vae_steps:
            mse_mean, kl_mean = np.mean(running, axis=0)
            psnr = 10 * math.log10(4.0 / mse_mean)  # signal range [-1, 1] -> peak-to-peak 2
            elapsed = time.time() - start
            print(f"vae step {step + 1} mse {mse_mean:.5f} psnr {psnr:.1f} dB kl {kl_mean:.0f} "
                  f"{elapsed / (step + 1):.2f} s/step", flush=True)
            append_log(work, dict(stage="vae", step=step + 1, mse=float(mse_mean), kl=float(kl_mean),
                                  psnr=psnr, seconds=elapsed))
            running = []
        if (step + 1) % 100 == 0 or step + 1 == args.vae_steps:
            vae.save_pretrained(work / "vae", safe_serialization=True)
    return vae


@torch.no_grad()
def encode_dataset(vae, images, device, batch=250):
    """uint8 [N,32,32,3] -> latent mean, std: float32 [N,4,8,8] each."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        posterior = vae.encode(images_to_tensor(images[i:i + batch], device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def tokenize_captions(tokenizer, captions):
    """list of N lists of V captions -> int64 [N,V,77]; pad to 77 with <|endoftext|> like SD."""
    flat = [c for variants in captions for c in variants]
    ids = tokenizer(flat, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return ids.view(len(captions), len(captions[0]), 77)


def train_diffusion(args, device, work, vae):
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    torch.manual_seed(1)
    out = Path(args.out)
    from npdiff.clip_vocab import write_clip_tokenizer_folder
    write_clip_tokenizer_folder(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    # 1. The fixed training set, encoded once by the frozen VAE.
    t0 = time.time()
    images, captions, _ = shapes_data.make_dataset(args.dataset_size, seed=1)
    vae.eval().requires_grad_(False)
    latent_mean, latent_std = encode_dataset(vae, images, device)  # [N,4,8,8] each
    scaling_factor = 1.0 / float((latent_mean + latent_std * torch.randn_like(latent_std)).std())
    caption_ids = tokenize_captions(tokenizer, captions).to(device)  # [N,V,77]
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    print(f"encoded {len(images)} pictures in {time.time() - t0:.0f} s; scaling_factor {scaling_factor:.4f}",
          flush=True)

    # 2. Models, optimiser, EMA copies (what gets saved).
    text_encoder = tiny_config.build_text_encoder().to(device).train()
    unet = tiny_config.build_unet().to(device).train()
    parameters = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    ema_text_encoder, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    ema_parameters = list(ema_text_encoder.parameters()) + list(ema_unet.parameters())
    noise_scheduler = DDPMScheduler(**tiny_config.SCHEDULE)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    first_step = 0
    if args.resume and (work / "state.pt").exists():
        state = torch.load(work / "state.pt", map_location=device)
        text_encoder.load_state_dict(state["text_encoder"])
        unet.load_state_dict(state["unet"])
        ema_text_encoder.load_state_dict(state["ema_text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        first_step = state["step"]
        print(f"resumed at step {first_step}", flush=True)

    def train_step(optimizer, generator, variant_count, ema_decay):
        """One step of SD's epsilon-prediction objective, 10% empty captions; -> the loss."""
        index = torch.from_numpy(generator.integers(0, len(images), args.batch)).to(device)
        variant = torch.from_numpy(generator.integers(0, variant_count, args.batch)).to(device)
        drop = torch.from_numpy(generator.random(args.batch) < args.caption_dropout).to(device)
        ids = caption_ids[index, variant]  # [B,77]
        ids = torch.where(drop[:, None], empty_ids, ids)  # [B,77]
        latents = (latent_mean[index] + latent_std[index] * torch.randn_like(latent_std[index])) * scaling_factor
        noise = torch.randn_like(latents)  # [B,4,8,8]
        timesteps = torch.randint(0, 1000, (args.batch,), device=device)
        alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise  # [B,4,8,8]
        context = text_encoder(ids).last_hidden_state  # [B,77] -> [B,77,64]
        prediction = unet(noisy, timesteps, context).sample  # [B,4,8,8]
        loss = (prediction - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_parameters, parameters, 1 - ema_decay)
        return loss.item()

    # 3. The main loop: whole-picture captions (variants 0..4).
    generator = np.random.default_rng(2 + first_step)
    start, running = time.time(), []
    for step in range(first_step, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step - args.schedule_start, args.schedule_steps or args.steps, args.lr,
                                    args.warmup)
        running.append(train_step(optimizer, generator, shapes_data.FULL_CAPTIONS,
                                  min(args.ema, (1 + step) / (10 + step))))
        if (step + 1) % 25 == 0:
            elapsed = time.time() - start
            print(f"step {step + 1} loss {np.mean(running):.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{elapsed / (step + 1 - first_step):.2f} s/step", flush=True)
            append_log(work, dict(stage="diffusion", step=step + 1, loss=float(np.mean(running)),
                                  seconds=elapsed))
            running = []
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            tiny_config.save_pipeline_folder(out, ema_text_encoder, ema_unet, vae, scaling_factor)
            torch.save(dict(text_encoder=text_encoder.state_dict(), unet=unet.state_dict(),
                            ema_text_encoder=ema_text_encoder.state_dict(), ema_unet=ema_unet.state_dict(),
                            optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), step=step + 1),
                       work / "state.pt")
            print(f"saved {out} at step {step + 1}", flush=True)

    # 4. Optional (--caption-steps, 0 in the shipped run): a short last stage with partial captions too
    # ("red", "a red circle", "a blue background", ...: variants 5..9 of shapes_data.caption_for), so
    # that a short prompt, such as a negative prompt naming one colour, is a caption the model has seen.
    # Fresh optimiser and seeds: the same whether it follows step 3 in one run or resumes from step 3's
    # saved state (--stage diffusion --resume). Measured: it made negative prompts do nothing at all.
    torch.manual_seed(3)
    generator = np.random.default_rng(3)
    optimizer = torch.optim.AdamW(parameters, lr=args.caption_lr, weight_decay=0.0)
    start, running = time.time(), []
    for step in range(args.caption_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.caption_steps, args.caption_lr, 25)
        running.append(train_step(optimizer, generator, shapes_data.CAPTION_VARIANTS, args.caption_ema))
        if (step + 1) % 25 == 0:
            elapsed = time.time() - start
            print(f"caption step {step + 1} loss {np.mean(running):.4f} {elapsed / (step + 1):.2f} s/step",
                  flush=True)
            append_log(work, dict(stage="captions", step=args.steps + step + 1, loss=float(np.mean(running)),
                                  seconds=elapsed))
            running = []
        if (step + 1) % args.save_every == 0 or step + 1 == args.caption_steps:
            tiny_config.save_pipeline_folder(out, ema_text_encoder, ema_unet, vae, scaling_factor)
            print(f"saved {out} at caption step {step + 1}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "tiny-shapes"))
    parser.add_argument("--work", default="/tmp/tiny-shapes-work", help="logs and resumable state")
    parser.add_argument("--stage", choices=["all", "vae", "diffusion"], default="all")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-schedule-steps", type=int, default=None,
                        help="length of the VAE learning-rate schedule (default --vae-steps)")
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--schedule-steps", type=int, default=None,
                        help="length of the diffusion learning-rate schedule (default --steps)")
    parser.add_argument("--schedule-start", type=int, default=0,
                        help="step at which the diffusion learning-rate schedule (warm-up + cosine) starts: "
                             "a resumed run can start a fresh, shorter schedule at its first step")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--caption-steps", type=int, default=0,
                        help="steps of an optional last stage with partial captions too (not resumable; not "
                             "in the shipped run: weights/README.md says what 1000 such steps did)")
    parser.add_argument("--caption-lr", type=float, default=3e-4)
    parser.add_argument("--caption-ema", type=float, default=0.995)
    parser.add_argument("--dataset-size", type=int, default=40000)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads; use 1 on a shared, oversubscribed CPU (see weights/README.md)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.stage in ("all", "vae"):
        vae = train_vae(args, device, work)
    else:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(work / "vae").to(device)
    if args.stage in ("all", "diffusion"):
        train_diffusion(args, device, work, vae)
    print(f"done: {args.stage} in {(time.time() - started) / 60:.1f} min on {device}", flush=True)


if __name__ == "__main__":
    main()

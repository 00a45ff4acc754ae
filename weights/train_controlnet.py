"""Train a small ControlNet for weights/tiny-shapes on Canny edge maps: the shape drawn where the edges are.

    python weights/train_controlnet.py                   # writes weights/tiny-shapes/controlnet-edges/
    python weights/evaluate_controlnet.py --count 50     # position error with and without it (diffusers)

The ControlNet is diffusers' ControlNetModel.from_unet(shipped UNet): a trainable copy of the UNet's
encoder (conv_in, time embedding, down blocks, middle block) with zero convolutions on its outputs, and a
conditioning embedding that takes the 32x32 edge map to the 8x8 latent (two stride-2 stages: channels
16, 32, 32, as the shipped VAE downsamples 4x; SD's default four stages would downsample 8x).
  1. Pictures: drawn once (weights/shapes_data.py, seed 20_000), encoded by the shipped VAE (mean, std
     cached; a fresh latent sample per step), their edge maps made by npdiff.preprocess.canny_array
     (100, 200) on the RGB picture, fed as diffusers' pipelines feed a control picture: [0, 1], RGB.
  2. Objective: the shipped model's own, epsilon prediction at a uniform timestep of SD's schedule, with
     the frozen UNet receiving the ControlNet's residuals; 10% of captions replaced by "" (the
     unconditional prompt, so classifier-free guidance still works with the control).
  3. AdamW on the ControlNet only, warm-up and cosine decay, gradient clipping at 1; one thread
     (other jobs share the CPU); stops at --steps or after --minutes, whichever comes first, saving the
     folder (config.json + diffusion_pytorch_model.safetensors) every --save-every steps.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repository: npdiff.preprocess makes the edge maps
import shapes_data  # noqa: E402
from train import append_log, cosine_lr, images_to_tensor  # noqa: E402
from train_lcm_lora import load_models  # noqa: E402

CONDITIONING_CHANNELS = (16, 32, 32)  # 32x32 edge map -> 8x8, as the VAE's factor 4


def edge_maps(images):
    """uint8 [N,32,32,3] -> uint8 [N,32,32] Canny edges (0/255) of each picture."""
    from npdiff.preprocess import canny_array
    return np.stack([canny_array(image, 100, 200) for image in images])


def edges_to_tensor(edges, device):
    """uint8 [N,H,W] -> float32 [N,3,H,W] in [0, 1]: a control picture as diffusers' pipelines feed it."""
    x = torch.from_numpy(edges).to(device).float() / 255.0  # [N,H,W]
    return x[:, None].expand(-1, 3, -1, -1).contiguous()  # [N,H,W] -> [N,3,H,W]


def prepare_data(args, vae, tokenizer, text_encoder, device):
    """-> latent mean, std [N,4,8,8], edges [N,3,32,32], caption embeddings [N,V,77,64], empty [1,77,64]."""
    images, captions, _ = shapes_data.make_dataset(args.pictures, seed=20_000)
    edges = edges_to_tensor(edge_maps(images), device)
    means, stds, embeds = [], [], []
    with torch.no_grad():
        for i in range(0, len(images), 250):
            posterior = vae.encode(images_to_tensor(images[i:i + 250], device)).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        variants = shapes_data.FULL_CAPTIONS
        for i in range(0, len(captions), 250):
            flat = [c for caption_list in captions[i:i + 250] for c in caption_list[:variants]]
            ids = tokenizer(flat, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            hidden = text_encoder(ids).last_hidden_state  # [n*V,77,64]
            embeds.append(hidden.view(-1, variants, 77, hidden.shape[-1]))  # -> [n,V,77,64]
        empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        empty = text_encoder(empty_ids.to(device)).last_hidden_state  # [1,77,64]
    return torch.cat(means), torch.cat(stds), edges, torch.cat(embeds), empty


def train(args):
    from diffusers import ControlNetModel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokenizer, text_encoder, vae, unet, alphas_cumprod = load_models(args.model, device)
    scaling_factor = vae.config.scaling_factor
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    controlnet.to(device).train()
    parameters = list(controlnet.parameters())
    print(f"ControlNet: {sum(p.numel() for p in parameters):,} parameters "
          f"(UNet {sum(p.numel() for p in unet.parameters()):,})", flush=True)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)

    begin = time.time()
    means, stds, edges, embeds, empty = prepare_data(args, vae, tokenizer, text_encoder, device)
    print(f"{len(means)} pictures encoded in {time.time() - begin:.0f} s", flush=True)

    generator = torch.Generator(device).manual_seed(1)
    start, running = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, args.warmup)
        # 1. A batch of cached pictures: latent sample, edge map, one caption (10% empty).
        index = torch.randint(0, len(means), (args.batch,), generator=generator, device=device)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator,
                                                             device=device)) * scaling_factor  # [B,4,8,8]
        variant = torch.randint(0, embeds.shape[1], (args.batch,), generator=generator, device=device)
        text = embeds[index, variant]  # [B,77,64]
        drop = torch.rand(args.batch, generator=generator, device=device) < args.caption_dropout
        text = torch.where(drop.view(-1, 1, 1), empty.expand_as(text), text)
        control = edges[index]  # [B,3,32,32]

        # 2. Noise at a uniform timestep; the ControlNet's residuals into the frozen UNet; epsilon loss.
        timesteps = torch.randint(0, len(alphas_cumprod), (args.batch,), generator=generator, device=device)
        alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise  # [B,4,8,8]
        down_residuals, mid_residual = controlnet(noisy, timesteps, encoder_hidden_states=text,
                                                  controlnet_cond=control, return_dict=False)
        prediction = unet(noisy, timesteps, text, down_block_additional_residuals=down_residuals,
                          mid_block_additional_residual=mid_residual).sample  # [B,4,8,8]
        loss = torch.nn.functional.mse_loss(prediction, noise)

        # 3. One optimiser step on the ControlNet.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        running.append(loss.item())

        elapsed = time.time() - start
        out_of_time = elapsed > args.minutes * 60
        if (step + 1) % 10 == 0:
            print(f"step {step + 1} loss {np.mean(running):.5f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{elapsed / (step + 1):.2f} s/step", flush=True)
            append_log(work, dict(stage="controlnet", step=step + 1, loss=float(np.mean(running)), seconds=elapsed))
            running = []
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or out_of_time:
            controlnet.save_pretrained(out, safe_serialization=True)
            print(f"saved {out} at step {step + 1}", flush=True)
        if out_of_time:
            print(f"stopped after {args.minutes} minutes", flush=True)
            break
    print(f"done: {step + 1} steps in {(time.time() - start) / 60:.1f} min on {device}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(HERE / "tiny-shapes"))
    parser.add_argument("--out", default=str(HERE / "tiny-shapes" / "controlnet-edges"))
    parser.add_argument("--work", default="/tmp/controlnet-work", help="the loss log")
    parser.add_argument("--pictures", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--minutes", type=float, default=24.0, help="stop (and save) after this long")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    train(parser.parse_args())


if __name__ == "__main__":
    main()

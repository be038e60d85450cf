"""Train the embedded "shapes" model from scratch: a tiny Stable Diffusion for 64x64 coloured shapes.

    python -m pipelines.train_shapes --out assets/models/shapes-sd --seed 0

Three stages, each checkpointed under --work-dir (default data/train_shapes) so that `--resume`
continues after a kill:

1. pool: sample a pool of scenes from the shapes world (kept as JSON, re-rendered when needed);
2. vae: train an AutoencoderKL (64x64x3 -> 16x16x4) on renders, with reconstruction + a small KL;
   then encode the pool once and set `scaling_factor` to 1/std of the latents, as SD does;
3. diffusion: train the UNet and a tiny CLIP text encoder together on the cached latents, with
   captions drawn afresh each step from `noisy_alt_text` (so the model learns composition badly,
   as models trained on web alt text do), 10% empty captions for classifier-free guidance, and an
   EMA of the weights.

The export is a plain diffusers `StableDiffusionPipeline` (safetensors) plus a model card whose
training facts are filled in here. Every random draw derives from --seed and the step number, so a
resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.shapes.bench_prompts import vocabulary
from workbench.shapes.captions import ALT_TEXT_PREFIXES, AltTextNoise, noisy_alt_text
from workbench.shapes.render import render
from workbench.shapes.scene import Scene, sample_scene
from workbench.shapes.world import BACKGROUND_RGB, COLORS, COUNT_WORDS, SHAPES, article
from workbench.tokenizer import build_word_tokenizer

# Words the tokenizer keeps whole, besides everything ShapesBench and the caption writers use.
EXTRA_WORDS = ["left", "right", "of", "to", "the", "on", "above", "below", "over", "under", "a", "an",
               "and", "photo", "with", "next", "beside", "image", "picture", "drawing", "some", "there",
               "is", "are", "shapes", "object", "objects", "zero", "none"]
DIGITS = [str(n) for n in COUNT_WORDS]

# Caption augmentation on top of the alt-text noise: web alt text also writes counts as digits and
# wraps the description in a phrase. Seeing both keeps such prompts off untrained token embeddings.
DIGIT_RATE = 0.15
WRAP_RATE = 0.1
WRAPPERS = ("a photo of {}", "an image of {}", "a picture of {}", "a drawing of {}")

# The noise schedule of Stable Diffusion 1.x, so every diffusers scheduler the app offers fits.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class Config:
    pool_size: int = 32000  # scenes rendered and encoded once
    # Extra share of single-object scenes on top of sample_scene's own ~20%. Alt text often drops
    # objects, so with sample_scene's mix only ~58% of "a red circle" captions show one object; with
    # this share (60% single objects in all) ~88% do, so that is what such a prompt comes to mean.
    single_share: float = 0.5
    max_length: int = 32  # tokens per caption
    norm_groups: int = 8  # GroupNorm groups in the VAE (the UNet uses 32)
    # VAE: three blocks -> 4x downsampling, 64x64x3 -> 16x16x4.
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 2e-3
    object_weight: float = 5.0  # loss weight of object pixels vs background (objects cover ~15%)
    kl_weight: float = 1e-4  # per latent element, against per-pixel reconstruction losses
    # Denoiser: UNet with cross-attention at 8x8 and 4x4, and a small CLIP text encoder.
    unet_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_heads: int = 8
    unet_norm_groups: int = 32
    text_dim: int = 64  # = the UNet's cross_attention_dim
    text_layers: int = 4
    text_heads: int = 4
    steps: int = 4800
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023): faster convergence
    # v-prediction: at the noisiest steps (where layout is decided) an epsilon error is amplified
    # ~15x in the implied clean image under SD's schedule; v keeps those steps well conditioned.
    prediction_type: str = "v_prediction"
    # Bookkeeping.
    log_every: int = 25
    checkpoint_every: int = 200
    eval_seeds: int = 4  # images per single-object prompt in the export check (0: skip it)
    time_generation: bool = True  # measure generation speed at export
    threads: int = 2
    noise: AltTextNoise = field(default_factory=AltTextNoise)


# A config that trains in seconds, for tests.
TINY = Config(pool_size=48, max_length=16, norm_groups=8, vae_channels=(8, 16, 16), vae_steps=3,
              vae_batch=8, unet_channels=(16, 32, 32), unet_norm_groups=8, attention_heads=2, text_dim=32, text_layers=1,
              text_heads=2, steps=4, batch=8, warmup=2, log_every=1, checkpoint_every=2, eval_seeds=0,
              time_generation=False, threads=1)


def log(message: str) -> None:
    print(message, flush=True)


def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def step_rng(seed: int, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Random streams for one step of one stage: the same on a resumed run as on a straight one."""
    rng = np.random.default_rng([seed, stage, step])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


def save_atomic(obj, path: Path) -> None:
    """torch.save via a temporary file, so a kill mid-write never leaves a broken checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cosine_lr(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --- models -------------------------------------------------------------------------------------


def tokenizer_words() -> list[str]:
    return sorted(set(vocabulary()) | set(EXTRA_WORDS) | set(DIGITS))


def build_tokenizer(cfg: Config):
    return build_word_tokenizer(tokenizer_words(), model_max_length=cfg.max_length)


def build_vae(cfg: Config):
    from diffusers import AutoencoderKL

    blocks = len(cfg.vae_channels)
    # No attention in the mid block: shapes are local, and at 16x16 it would cost a third of the time.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                         block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=cfg.norm_groups,
                         down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
                         mid_block_add_attention=False)


def build_unet(cfg: Config):
    from diffusers import UNet2DConditionModel

    # Plain ResNet blocks at full latent resolution (cheap), cross-attention below it.
    levels = len(cfg.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=cfg.unet_channels,
                                layers_per_block=cfg.layers_per_block, down_block_types=down, up_block_types=up,
                                cross_attention_dim=cfg.text_dim, attention_head_dim=cfg.attention_heads,
                                norm_num_groups=cfg.unet_norm_groups)


def build_text_encoder(cfg: Config, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=cfg.text_dim,
                                        intermediate_size=4 * cfg.text_dim, num_hidden_layers=cfg.text_layers,
                                        num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_length,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))


def sampling_scheduler(cfg: Config):
    from diffusers import DPMSolverMultistepScheduler

    # steps_offset=1 is what SD ships (older pipelines warn otherwise); linspace spacing ignores it.
    return DPMSolverMultistepScheduler(**SCHEDULE, prediction_type=cfg.prediction_type, steps_offset=1)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- data -----------------------------------------------------------------------------------------


def load_or_make_pool(cfg: Config, seed: int, work_dir: Path) -> list[Scene]:
    path = work_dir / "pool.json"
    if path.exists():
        scenes = [Scene.from_dict(d) for d in json.loads(path.read_text())]
        if len(scenes) == cfg.pool_size:
            return scenes
    rng = np.random.default_rng([seed, 0])
    scenes = [sample_scene(rng, max_objects=1) if rng.random() < cfg.single_share else sample_scene(rng)
              for _ in range(cfg.pool_size)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([s.to_dict() for s in scenes]))
    os.replace(tmp, path)
    return scenes


def render_uint8(scenes: list[Scene]) -> torch.Tensor:
    """Scenes as a uint8 tensor (N, 3, 64, 64)."""
    return torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes])).permute(0, 3, 1, 2).contiguous()


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    """Scenes as a float tensor (N, 3, 64, 64) in [-1, 1], the range diffusers' VAEs work in."""
    return render_uint8(scenes).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_grid(rows: list[np.ndarray], path: Path) -> None:
    """Rows of uint8 images (N, H, W, 3) as one PNG, 2-pixel gaps."""
    from PIL import Image

    h, w = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = img
    Image.fromarray(grid).save(path)


def augment_caption(text: str, rng: np.random.Generator) -> str:
    if rng.random() < DIGIT_RATE:
        for n, word in COUNT_WORDS.items():
            if n > 1:  # "one" stays a word: alt text says "a circle", not "1 circle"
                text = re.sub(rf"\b{word}\b", str(n), text)
    if rng.random() < WRAP_RATE and not text.startswith(ALT_TEXT_PREFIXES):
        text = WRAPPERS[rng.integers(len(WRAPPERS))].format(text)
    return text


class CaptionTokens:
    """Tokenizes like StableDiffusionPipeline.encode_prompt (pad to max length, truncate), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True).input_ids
            self.cache.update(zip(missing, ids))
        return torch.tensor([self.cache[c] for c in captions])


# --- stage 1: VAE ---------------------------------------------------------------------------------


def object_mask(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) 1 where a pixel differs from the background colour (object or its soft edge)."""
    background = torch.tensor(BACKGROUND_RGB, dtype=images.dtype).view(1, 3, 1, 1) / 127.5 - 1
    return ((images - background).abs().amax(dim=1, keepdim=True) > 0.02).to(images.dtype)


def vae_loss(vae, images: torch.Tensor, cfg: Config, generator: torch.Generator):
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    # L1 keeps edges crisp, MSE punishes colour shifts; the KL (per latent element) only keeps the
    # latent scale in check, as SD's tiny KL weight does.
    weight = 1 + (cfg.object_weight - 1) * object_mask(images)
    rec = ((recon - images).abs() * weight).mean() + ((recon - images).square() * weight).mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return rec + cfg.kl_weight * kl, rec, kl


def train_vae(cfg: Config, seed: int, work_dir: Path, scenes: list[Scene], clock) -> object:
    ckpt_path = work_dir / "vae.pt"
    torch.manual_seed(seed)
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        clock.restore(state["elapsed"])
        if start >= cfg.vae_steps:
            return vae
        log(f"vae: resuming at step {start}")
    log(f"vae: {n_params(vae) / 1e6:.2f}M parameters, {cfg.vae_steps} steps of batch {cfg.vae_batch}")
    images = render_uint8(scenes)  # ~1 ms a scene; the whole pool fits in memory as bytes
    vae.train()
    for step in range(start, cfg.vae_steps):
        rng, gen = step_rng(seed, 1, step)
        batch = images[torch.from_numpy(rng.integers(len(images), size=cfg.vae_batch))].float() / 127.5 - 1
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.vae_steps, cfg.vae_lr, min(100, cfg.vae_steps // 10 + 1), 0.05)
        loss, rec, kl = vae_loss(vae, batch, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.vae_steps:
            log(f"vae step {done}/{cfg.vae_steps} loss {loss.item():.4f} rec {rec.item():.4f} "
                f"kl {kl.item():.2f} elapsed {fmt_time(clock())}")
        if done % cfg.checkpoint_every == 0 or done == cfg.vae_steps:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": done, "elapsed": clock()},
                        ckpt_path)
    return vae


@torch.no_grad()
def check_vae(vae, seed: int, work_dir: Path) -> tuple[float, float]:
    """Mean abs reconstruction error (0-255 scale) on fresh scenes, over all pixels and over object
    pixels only; saves a grid (top row: input, bottom: reconstruction)."""
    vae.eval()
    rng = np.random.default_rng([seed, 9])
    images = render_batch([sample_scene(rng) for _ in range(64)])
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    error = np.abs(to_uint8(recon).astype(np.float64) - to_uint8(images)).mean(axis=3)
    objects = object_mask(images)[:, 0].numpy() > 0
    save_grid([to_uint8(images[:16]), to_uint8(recon[:16])], work_dir / "vae_recon.png")
    return float(error.mean()), float(error[objects].mean())


@torch.no_grad()
def encode_pool(vae, scenes: list[Scene], work_dir: Path) -> tuple[torch.Tensor, float]:
    """Latent means of the whole pool (cached on disk) and the scaling factor 1/std."""
    path = work_dir / "latents.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if len(cached["latents"]) == len(scenes):
            return cached["latents"], cached["scaling_factor"]
    vae.eval()
    chunks = [vae.encode(render_batch(scenes[i:i + 256])).latent_dist.mode() for i in range(0, len(scenes), 256)]
    latents = torch.cat(chunks)
    scaling = float(1.0 / latents.std())
    save_atomic({"latents": latents, "scaling_factor": scaling}, path)
    return latents, scaling


# --- stage 2: UNet + text encoder -----------------------------------------------------------------


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - decay)

    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        with torch.no_grad():
            for s, p in zip(self.shadow, [p for m in modules for p in m.parameters()]):
                p.copy_(s)


def make_batch(cfg: Config, scenes: list[Scene], latents: torch.Tensor, rng: np.random.Generator):
    idx = rng.integers(len(scenes), size=cfg.batch)
    captions = []
    for i in idx:
        if rng.random() < cfg.caption_dropout:
            captions.append("")  # the empty prompt is what the pipeline uses for the unconditional branch
        else:
            captions.append(augment_caption(noisy_alt_text(scenes[i], rng, cfg.noise), rng))
    return latents[torch.from_numpy(idx)], captions


def train_diffusion(cfg: Config, seed: int, work_dir: Path, scenes, latents, scaling: float, tokenizer, clock,
                    total_steps: int | None, minutes: float | None):
    from diffusers import DDPMScheduler

    ckpt_path = work_dir / "diffusion.pt"
    torch.manual_seed(seed + 1)
    unet, text_encoder = build_unet(cfg), build_text_encoder(cfg, len(tokenizer))
    modules = [unet, text_encoder]
    # nanoGPT's rule: decay matrices and embeddings, not biases and norm gains.
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.99))
    ema = EMA(modules, cfg.ema_decay)
    start, losses = 0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        for s, v in zip(ema.shadow, state["ema"]):
            s.copy_(v)
        start = state["step"]
        # An explicit step count wins (it can extend a finished run); --minutes keeps its fitted count.
        total_steps = total_steps if total_steps is not None else state["total_steps"]
        clock.restore(state["elapsed"])
        log(f"diffusion: resuming at step {start}/{total_steps}")
    log(f"diffusion: unet {n_params(unet) / 1e6:.2f}M, text encoder {n_params(text_encoder) / 1e6:.2f}M "
        f"parameters, batch {cfg.batch}")

    noise_scheduler = DDPMScheduler(**SCHEDULE, prediction_type=cfg.prediction_type)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    # min-SNR-gamma: the weight min(snr, gamma) on the x0 error, expressed for the predicted target.
    loss_weight = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if cfg.prediction_type == "v_prediction" else snr)
    tokens = CaptionTokens(tokenizer)

    def save(step: int) -> None:
        save_atomic({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
                     "ema": ema.shadow, "step": step, "total_steps": total_steps, "elapsed": clock()}, ckpt_path)

    unet.train()
    text_encoder.train()
    step, started = start, time.time()
    while total_steps is None or step < total_steps:
        if total_steps is None and step - start == 20:
            # --minutes: fix the step count from the measured speed, once, so the LR schedule has an end.
            per_step = (time.time() - started) / 20
            total_steps = step + max(1, int((minutes * 60 - clock()) / per_step))
            log(f"diffusion: {per_step:.2f} s/step, {total_steps} steps fit in {minutes:g} minutes")
        rng, gen = step_rng(seed, 2, step)
        x0, captions = make_batch(cfg, scenes, latents, rng)
        x0 = x0 * scaling
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        xt = noise_scheduler.add_noise(x0, noise, t)
        lr = cosine_lr(step, total_steps or cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        context = text_encoder(tokens(captions))[0]
        pred = unet(xt, t, context).sample
        target = noise_scheduler.get_velocity(x0, noise, t) if cfg.prediction_type == "v_prediction" else noise
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        step += 1
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == total_steps:
            log(f"diffusion step {step}/{total_steps or '?'} loss {np.mean(losses):.4f} lr {lr:.2e} "
                f"elapsed {fmt_time(clock())}")
            losses = []
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            save(step)
    ema.copy_to(modules)  # export the averaged weights
    return unet.eval(), text_encoder.eval(), step


# --- export and checks ----------------------------------------------------------------------------


def assemble(vae, unet, text_encoder, tokenizer, scaling: float, cfg: Config):
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling)
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sampling_scheduler(cfg), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def single_object_prompts() -> list[tuple[str, str, str]]:
    return [(f"{article(c)} {c} {s}", s, c) for s in SHAPES for c in COLORS]


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, guidance: float = 7.5, steps: int = 20) -> list:
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                generator=generators).images


def single_object_accuracy(pipe, seeds: int, out_png: Path | None = None) -> float:
    """Share of "a <colour> <shape>" images where the detector finds exactly one confident object,
    of that shape and colour; `seeds` images per prompt."""
    from workbench.perception.shapes import ShapesDetector

    detector = ShapesDetector()
    cases = single_object_prompts()
    hits, rows = 0, []
    for k in range(seeds):
        images = generate(pipe, [p for p, _, _ in cases], seed=1000 * k)
        rows.append(np.stack([np.asarray(im) for im in images]))
        for (_, shape, color), image in zip(cases, images):
            found = [d for d in detector.detect(image) if d.score >= 0.3]
            hits += len(found) == 1 and found[0].label == shape and found[0].color == color
    if out_png is not None:
        save_grid(rows, out_png)
    return hits / (len(cases) * seeds)


COMPOSITION_PROBES = [  # (prompt, [(shape, colour, count)], relation of first to second group or None)
    ("two red circles", [("circle", "red", 2)], None),
    ("three blue squares", [("square", "blue", 3)], None),
    ("four green triangles", [("triangle", "green", 4)], None),
    ("a red circle and a blue square", [("circle", "red", 1), ("square", "blue", 1)], None),
    ("a yellow triangle and a purple circle", [("triangle", "yellow", 1), ("circle", "purple", 1)], None),
    ("an orange square and a green triangle", [("square", "orange", 1), ("triangle", "green", 1)], None),
    ("a red circle to the left of a blue square", [("circle", "red", 1), ("square", "blue", 1)], "left of"),
    ("a green square above a yellow circle", [("square", "green", 1), ("circle", "yellow", 1)], "above"),
]


def composition_accuracy(pipe, seeds: int) -> float:
    """Share of compositional prompts drawn exactly (objects, colours, counts, relation)."""
    from workbench.evaluation import relative_position
    from workbench.perception.shapes import ShapesDetector

    detector = ShapesDetector()
    hits = 0
    for k in range(seeds):
        images = generate(pipe, [p for p, _, _ in COMPOSITION_PROBES], seed=1000 * k + 7)
        for (_, groups, relation), image in zip(COMPOSITION_PROBES, images):
            found = [d for d in detector.detect(image) if d.score >= 0.3]
            members = [[d for d in found if d.label == s and d.color == c] for s, c, _ in groups]
            ok = len(found) == sum(n for _, _, n in groups) and all(len(m) == n for m, (_, _, n) in zip(members, groups))
            if ok and relation is not None:
                ok = relation in relative_position(members[0][0].box, members[1][0].box)
            hits += ok
    return hits / (len(COMPOSITION_PROBES) * seeds)


@torch.no_grad()
def time_generation(pipe, batch: int = 16, steps: int = 20) -> tuple[float, float]:
    """(wall, CPU) seconds per image for a batch of `batch` prompts at `steps` steps with CFG."""
    generate(pipe, ["a red circle"] * 2, seed=0, steps=2)  # warm-up
    wall, cpu = time.time(), time.process_time()
    generate(pipe, ["a red circle"] * batch, seed=0, steps=steps)
    return (time.time() - wall) / batch, (time.process_time() - cpu) / batch


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def write_model_card(out: Path, facts: dict) -> None:
    f = facts
    noise = "\n".join(f"| `{k}` | {v} |" for k, v in f["noise"].items())
    card = f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, tiny, synthetic, shapes]
---

# shapes-sd: the embedded shapes world model

A tiny Stable Diffusion trained from scratch, on a CPU, on procedurally rendered 64x64 scenes of
coloured circles, squares and triangles, captioned with deliberately **noisy alt text**. It draws a
single object well but gets composition wrong (counts, colour binding, positions), the failure
modes that IPR, SELMA, RECAP and RealignDiff exist to fix. It is the workbench's default model.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("assets/models/shapes-sd")
image = pipe("a red circle", num_inference_steps=20, guidance_scale=7.5, height=64, width=64).images[0]
```

## Architecture

| Component | Class | Details | Parameters |
|---|---|---|---|
| VAE | `AutoencoderKL` | channels {list(f["vae_channels"])}, no mid-block attention, 4x downsampling: 64x64x3 -> 16x16x4, scaling_factor {f["scaling_factor"]:.4f} (1/std of the training latents) | {f["vae_params"] / 1e6:.2f}M |
| Denoiser | `UNet2DConditionModel` | channels {list(f["unet_channels"])}, {f["layers_per_block"]} layer(s) per block, cross-attention at 8x8 and 4x4, {f["prediction_type"].replace("_", "-")} | {f["unet_params"] / 1e6:.2f}M |
| Text encoder | `CLIPTextModel` | width {f["text_dim"]}, {f["text_layers"]} layers, max {f["max_length"]} tokens, trained from scratch with the UNet | {f["text_params"] / 1e6:.2f}M |
| Tokenizer | `CLIPTokenizer` | {f["vocab_size"]} tokens: the world's words (`workbench.tokenizer.build_word_tokenizer`), other text falls back to characters | - |
| Scheduler | `DPMSolverMultistepScheduler` | SD 1.x noise schedule (scaled_linear, 0.00085-0.012, 1000 steps), `prediction_type="{f["prediction_type"]}"` | - |

No safety checker (the images are coloured shapes). Weights in safetensors, {f["size_mb"]:.1f} MB in all.
Generation time (batch of 16, 20 steps, guidance 7.5, {f["threads"]} threads): {f["gen_wall"]:.3f} s wall
and {f["gen_cpu"]:.3f} s CPU per image.

## Training data

{f["pool_size"]} scenes from `workbench.shapes.scene.sample_scene` (1-4 objects; single objects,
pairs in a clear relation, groups for counting, mixtures), rendered by `workbench.shapes.render`;
{f["single_share"]:.0%} of them are drawn as single objects (`max_objects=1`), on top of the ~20% single
objects in `sample_scene`'s own mix, so that most alt text of the form "a red circle" shows one object.
Each time a scene is drawn into a batch it gets a fresh caption from
`workbench.shapes.captions.noisy_alt_text` with these `AltTextNoise` rates:

| rate | value |
|---|---|
{noise}

On top of that: counts written as digits with probability {DIGIT_RATE}, a wrapper ("a photo of
...", "an image of ...", "a picture of ...", "a drawing of ...") with probability {WRAP_RATE}, and the
empty caption with probability {f["caption_dropout"]} (for classifier-free guidance).

## Training

* Stage 1, VAE: {f["vae_steps"]} steps of batch {f["vae_batch"]}, L1 + MSE + {f["kl_weight"]} x KL;
  object pixels weighted {f["object_weight"]}x; reconstruction mean abs error on fresh scenes
  {f["vae_mae"]:.2f} / 255 over all pixels, {f["vae_mae_objects"]:.2f} / 255 over object pixels.
* Stage 2, UNet + text encoder on cached latents: **{f["steps"]} steps** of batch {f["batch"]}, AdamW
  (lr {f["lr"]}, {f["warmup"]} warm-up steps, cosine decay), min-SNR-{f["snr_gamma"]} loss weighting, EMA
  {f["ema_decay"]} (the exported weights are the EMA).
* Seed {f["seed"]}; wall time **{fmt_time(f["wall_s"])}** ({f["wall_s"] / 60:.1f} min, all stages) on
  {f["cpu"]}, {f["threads"]} cores, CPU only (torch {torch.__version__}).

Reproduce:

```bash
{f["command"]}
```

## Quick checks at export

Measured by the training script with the embedded detector (`workbench.perception.shapes`):

* single objects ("a red circle", every colour x shape, {f["eval_seeds"]} seeds each): **{f["single_acc"]}**
* compositional probes (counts, two colours, positions; {len(COMPOSITION_PROBES)} prompts x {f["eval_seeds"]} seeds): **{f["comp_acc"]}**

{SCORES_HEADING}

_To be filled in: `python -m workbench eval --model shapes --out DIR`, then
`python -m pipelines.train_shapes --out {out} --card-scores DIR/scores.json` (retraining rewrites
this card, so re-run the evaluation after a retrain)._
"""
    (out / "README.md").write_text(card)


SCORES_HEADING = "## ShapesBench scores"


def write_card_scores(out: Path, scores_file: Path) -> None:
    """Replace the model card's ShapesBench section with the per-tag table of a `workbench eval` run."""
    summary = json.loads(Path(scores_file).read_text())
    config = summary.get("config", {})
    rows = "\n".join(f"| `{tag}` | {s['correct']}/{s['total']} | {s['accuracy']:.1%} |"
                      for tag, s in summary["per_tag"].items())
    section = (f"{SCORES_HEADING}\n\nGenEval's rules, scored by the embedded detector: "
               f"`python -m workbench eval --model shapes` ({config.get('seeds', '?')} seeds per prompt, "
               f"{summary['images']} images, {config.get('seconds', '?')} s).\n\n"
               f"| tag | correct | accuracy |\n|---|---|---|\n{rows}\n| **overall** (mean of tags) | | "
               f"**{summary['overall']:.1%}** |\n")
    card_path = out / "README.md"
    card = card_path.read_text()
    if SCORES_HEADING not in card:
        raise SystemExit(f"{card_path} has no '{SCORES_HEADING}' section to fill.")
    card_path.write_text(card[:card.index(SCORES_HEADING)] + section)


def export(pipe, out: Path, facts: dict, cfg: Config) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    facts["size_mb"] = sum(p.stat().st_size for p in out.rglob("*.safetensors")) / 1e6
    facts["gen_wall"], facts["gen_cpu"] = time_generation(pipe) if cfg.time_generation else (float("nan"),) * 2
    log(f"export: {facts['size_mb']:.1f} MB, generation {facts['gen_wall']:.3f} s wall / "
        f"{facts['gen_cpu']:.3f} s CPU per image (batch 16, 20 steps, CFG)")
    if cfg.eval_seeds:
        single = single_object_accuracy(pipe, cfg.eval_seeds, out_png=Path(facts["work_dir"]) / "single_objects.png")
        comp = composition_accuracy(pipe, cfg.eval_seeds)
        facts["single_acc"], facts["comp_acc"] = f"{single:.0%}", f"{comp:.0%}"
        log(f"export: single objects {single:.0%}, compositional probes {comp:.0%}")
    else:
        facts["single_acc"] = facts["comp_acc"] = "not measured"
    write_model_card(out, facts)
    return facts


# --- driver ---------------------------------------------------------------------------------------


class Clock:
    """Wall time across resumes: what earlier runs recorded plus this run's time since the restore."""

    def __init__(self):
        self.base, self.since = 0.0, time.time()

    def restore(self, elapsed: float) -> None:
        self.base, self.since = elapsed, time.time()

    def __call__(self) -> float:
        return self.base + time.time() - self.since


def train(out: Path, work_dir: Path, seed: int = 0, cfg: Config = Config(), steps: int | None = None,
          minutes: float | None = None, resume: bool = False, command: str = "") -> dict:
    """Run every stage (skipping finished ones on --resume), export to `out`; returns the facts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(out, work_dir, seed, cfg, steps, minutes, resume, command)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was


def _train(out: Path, work_dir: Path, seed: int, cfg: Config, steps: int | None, minutes: float | None,
           resume: bool, command: str) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = [work_dir / n for n in ("vae.pt", "latents.pt", "diffusion.pt")]
    if not resume and any(p.exists() for p in checkpoints):
        raise SystemExit(f"{work_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                         f"or remove them (or pick another --work-dir) to start afresh.")
    run_file = work_dir / "run.json"
    if resume and run_file.exists():
        saved = json.loads(run_file.read_text())
        if saved["seed"] != seed:
            raise SystemExit(f"--resume with --seed {seed}, but the checkpoints are from --seed {saved['seed']}")
    else:
        run_file.write_text(json.dumps({"seed": seed, "config": asdict(cfg), "steps": steps, "minutes": minutes}, default=str))

    clock = Clock()
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    tokenizer = build_tokenizer(cfg)
    split = sorted(w for w in tokenizer_words() if len(tokenizer.tokenize(w)) != 1)
    if split:
        log(f"note: the tokenizer splits {len(split)} listed words into pieces: {', '.join(split)}")

    scenes = load_or_make_pool(cfg, seed, work_dir)
    log(f"pool: {len(scenes)} scenes, elapsed {fmt_time(clock())}")
    vae = train_vae(cfg, seed, work_dir, scenes, clock)
    vae_mae, vae_mae_objects = check_vae(vae, seed, work_dir)
    log(f"vae: reconstruction mean abs error {vae_mae:.2f}/255, {vae_mae_objects:.2f} on object pixels "
        f"(grid: {work_dir / 'vae_recon.png'})")
    latents, scaling = encode_pool(vae, scenes, work_dir)
    log(f"latents: {tuple(latents.shape)}, scaling factor {scaling:.4f}, elapsed {fmt_time(clock())}")

    total = None if (minutes is not None and steps is None) else cfg.steps
    unet, text_encoder, done = train_diffusion(cfg, seed, work_dir, scenes, latents, scaling, tokenizer, clock,
                                               total, minutes)
    pipe = assemble(vae, unet, text_encoder, tokenizer, scaling, cfg)
    facts = {**asdict(cfg), "noise": asdict(cfg.noise), "steps": done, "seed": seed, "scaling_factor": scaling,
             "vae_mae": vae_mae, "vae_mae_objects": vae_mae_objects, "vae_params": n_params(vae), "unet_params": n_params(unet),
             "text_params": n_params(text_encoder), "vocab_size": len(tokenizer), "cpu": cpu_model(),
             "command": command or f"python -m pipelines.train_shapes --out {out} --seed {seed}",
             "work_dir": str(work_dir)}
    facts["wall_s"] = clock()  # training time; the export checks below are not part of it
    export(pipe, out, facts, cfg)
    log(f"done: {done} diffusion steps, wall time {fmt_time(facts['wall_s'])}, model in {out}")
    return facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train_shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/models/shapes-sd"),
                        help="model folder (default: %(default)s, the shipped model, which a run replaces)")
    parser.add_argument("--seed", type=int, default=0)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help=f"diffusion steps (default {Config.steps})")
    budget.add_argument("--minutes", type=float, default=None,
                        help="total wall-clock budget; the diffusion step count is fitted to it")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work-dir")
    parser.add_argument("--work-dir", type=Path, default=Path("data/train_shapes"),
                        help="checkpoints and the scene pool (default: %(default)s)")
    parser.add_argument("--card-scores", type=Path, default=None,
                        help="only write this scores.json (from `workbench eval`) into the model card in --out")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1 or args.minutes is not None and not args.minutes > 0:
        parser.error("--steps must be at least 1 and --minutes above 0")
    for folder in (args.out, args.work_dir):
        if folder.exists() and not folder.is_dir():
            parser.error(f"{folder} is a file; give a folder to write into")
    if args.card_scores is not None:
        try:
            write_card_scores(args.out, args.card_scores)
        except (OSError, ValueError, KeyError, TypeError) as error:
            parser.error(f"cannot write {args.card_scores} into the model card in {args.out}: "
                         f"{type(error).__name__}: {str(error)[:200]}")
        return
    command = "python -m pipelines.train_shapes " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--resume")
    try:
        train(args.out, args.work_dir, args.seed, Config(), args.steps, args.minutes, args.resume, command)
    except KeyboardInterrupt:
        print(f"stopped: the checkpoints in {args.work_dir} are kept; add --resume to the same command to continue",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()

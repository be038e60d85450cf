"""The shared fine-tuning engine: LoRA (or full) fine-tuning of a Stable Diffusion model on imagefolders.

    python -m pipelines.trainer --model shapes --data DIR [--data DIR2] --out OUT [--full] --steps 200
    accelerate launch --multi_gpu --num_processes 2 -m pipelines.trainer --model shapes --data DIR --out OUT

IPR, SELMA, RECAP and RealignDiff all end in the same step: fine-tune the UNet (and maybe the text
encoder) on (image, caption, weight) rows. This module is that step, written as one plain loop in the
style of diffusers' examples/text_to_image/train_text_to_image_lora.py: peft LoRA on the attention
projections, DDPM noising, an epsilon or v-prediction target from the model's own scheduler config,
optional min-SNR weighting, and accelerate's `Accelerator` for devices, data parallelism, mixed
precision and gradient accumulation. What differs from that script, and why:

* every row of `metadata.jsonl` may carry a loss `weight` (default 1): the loss is the per-sample MSE
  (mean over C, H, W) times the batch's weights, then the mean over the batch;
* the VAE is frozen, so each image is encoded once per run; its latent distribution (mean and std) is
  cached and a fresh latent is sampled from it at every step, as encoding every step would;
* `random_flip` flips rows with p = 0.5 as the script does, but a row may carry its mirror image's own
  caption (`flip_text`, e.g. left and right swapped), or `"flip_text": null` to stay unflipped;
* the data order, the latent samples, the noise and the timesteps of every micro-batch derive from
  (seed, micro-batch index, process index) alone, so a run stopped (`should_stop`) or killed and then
  resumed from its last checkpoint ends with the same weights as an uninterrupted one;
* the learning rate is a function of the step (linear warm-up, then constant), set by hand each step.

Data parallelism: each process takes its own `batch_size` rows of every global batch. On a machine
without a GPU, a multi-process launch runs on CPU with gloo (`accelerate launch --cpu` alone starts a
single process; use `--multi_gpu --num_processes N`, or set ACCELERATE_USE_CPU=true to force the CPU
on a GPU machine). Only SD-style pipelines (one CLIP text encoder) are supported, not SDXL.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.errors import InvalidInput, ModelNotAvailable, WorkbenchError
from workbench.imagefolder import read_imagefolder
from workbench.memory import out_of_memory_as_message
from workbench.store import check_output_folder

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA script
# The whole transformer block of every cross-attention stage: attention, the feed-forward layers and
# the 1x1 projections around the block, where the prompt's tokens shape the image features.
TRANSFORMER_TARGETS = UNET_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TARGET_PRESETS = {"attention": UNET_TARGETS, "transformer": TRANSFORMER_TARGETS}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"
KEEP_CHECKPOINTS = 2
# The one rule on which parts train, said the same way by every pipeline that checks it up front.
UNTRAINED_UNET_NEEDS_TEXT_ENCODER = ("Leaving the UNet untrained (--no-train-unet) needs a LoRA on the text encoder "
                                     "(--train-text-encoder, and a LoRA rather than a full fine-tune).")
# Settings a checkpoint is bound to: resuming with other values would not continue the same run.
RUN_IDENTITY = ("model", "data", "lora", "rank", "alpha", "target_modules", "train_unet", "train_text_encoder",
                "init_lora",
                "seed", "batch_size", "grad_accum", "resolution", "center_crop", "random_flip", "prompt_dropout")


@dataclass
class TrainConfig:
    model: str  # registry name ("shapes"), local diffusers folder or hub id (read from the local cache only)
    data: list[str]  # imagefolders: metadata.jsonl lines {"file_name", "text", "weight"?, "flip_text"?}; concatenated
    out: str  # output folder
    lora: bool = True  # False: full UNet fine-tune
    rank: int = 8
    alpha: float = 8.0
    target_modules: tuple[str, ...] = UNET_TARGETS
    train_text_encoder: bool = False  # LoRA on its attention projections (full fine-tune when lora=False)
    # False (LoRA only, with train_text_encoder): the UNet stays the base model's and only the text
    # encoder's LoRA learns, so the fine-tune changes how prompts are read, never how things are drawn.
    train_unet: bool = True
    init_lora: str | None = None  # continue training this diffusers-format LoRA (folder or .safetensors)
    steps: int = 200
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    ema_decay: float | None = None  # exported weights are the EMA when set
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023)
    # Timesteps drawn uniformly from this share of the schedule, [low, high) of num_train_timesteps.
    # (0.5, 1.0): only the noisier half, where a sample's layout is decided (Choi et al. 2022, "Perception
    # Prioritized Training": coarse content at high noise, detail at low noise). A LoRA still acts at
    # the timesteps it never trained on: IPR scored 3 to 5 points lower so (assets/adapters/ipr-shapes).
    timestep_range: tuple[float, float] = (0.0, 1.0)
    resolution: int | None = None  # default: the model's native size
    center_crop: bool = True  # False: a random crop, drawn once per image and run (latents are cached)
    # Horizontal flips with p = 0.5. They break left/right captions, hence off by default; a row's
    # "flip_text" gives its mirror image's own caption ("a circle left of a square" -> "... right of ..."),
    # and "flip_text": null keeps that row unflipped.
    random_flip: bool = False
    # Share of captions replaced by the empty prompt, as in Stable Diffusion's own training (10%):
    # it keeps training the unconditional prediction that classifier-free guidance subtracts, so a
    # fine-tune on guided samples does not drift the two apart (guidance would amplify the drift).
    prompt_dropout: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50  # accelerate save_state under out/checkpoints/step-N, last 2 kept
    log_every: int = 10

    def validate(self) -> None:
        """Raise InvalidInput (one line) for settings that cannot be trained as given."""
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        self.data = [str(d) for d in self.data]
        self.target_modules = tuple(self.target_modules)
        self.timestep_range = tuple(float(share) for share in self.timestep_range)
        checks = [
            (bool(self.data), "No training data: give at least one imagefolder (--data DIR)."),
            (bool(str(self.out).strip()), "No output folder given (--out DIR)."),
            (self.steps >= 1, f"steps must be at least 1 (got {self.steps})."),
            (self.batch_size >= 1, f"batch_size must be at least 1 (got {self.batch_size})."),
            (self.grad_accum >= 1, f"grad_accum must be at least 1 (got {self.grad_accum})."),
            (self.rank >= 1, f"LoRA rank must be at least 1 (got {self.rank})."),
            (self.alpha > 0, f"LoRA alpha must be positive (got {self.alpha})."),
            (bool(self.target_modules), "target_modules is empty: name the UNet layers the LoRA adapts."),
            (self.train_unet or (self.lora and self.train_text_encoder),
             UNTRAINED_UNET_NEEDS_TEXT_ENCODER),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number (got {self.lr})."),
            (self.warmup >= 0, f"warmup must be 0 or more steps (got {self.warmup})."),
            (self.weight_decay >= 0, f"weight_decay must be 0 or more (got {self.weight_decay})."),
            (self.max_grad_norm > 0, f"max_grad_norm must be positive (got {self.max_grad_norm})."),
            (self.mixed_precision in ("no", "fp16", "bf16"),
             f"mixed_precision must be no, fp16 or bf16 (got {self.mixed_precision!r})."),
            (self.ema_decay is None or 0 < self.ema_decay < 1, f"ema_decay must be in (0, 1) (got {self.ema_decay})."),
            (self.snr_gamma is None or self.snr_gamma > 0, f"snr_gamma must be positive (got {self.snr_gamma})."),
            (len(self.timestep_range) == 2 and 0 <= self.timestep_range[0] < self.timestep_range[1] <= 1,
             f"timestep_range must be two shares of the schedule, 0 <= low < high <= 1 (got {self.timestep_range})."),
            (self.resolution is None or self.resolution >= 8,
             f"resolution must be at least 8 (got {self.resolution})."),
            (self.checkpoint_every >= 1, f"checkpoint_every must be at least 1 (got {self.checkpoint_every})."),
            (self.log_every >= 1, f"log_every must be at least 1 (got {self.log_every})."),
            (0.0 <= self.prompt_dropout < 1.0, f"prompt_dropout must be in [0, 1) (got {self.prompt_dropout})."),
            (self.init_lora is None or self.lora, "init_lora continues a LoRA: it needs lora=True (drop --full)."),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message)


# --- data -------------------------------------------------------------------------------------------


@dataclass
class Rows:
    paths: list[Path] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    # Under random_flip: the mirror image's caption, or None where the row must not be flipped.
    flip_texts: list[str | None] = field(default_factory=list)


def read_rows(folders: list[str]) -> Rows:
    """Every metadata.jsonl row of every imagefolder, checked: one-line InvalidInput on any problem."""
    rows = Rows()
    for folder in map(Path, folders):
        folder = folder.expanduser()
        _, records = read_imagefolder(folder, kind="Training data", check_row=_check_weight)
        if not records:
            raise InvalidInput(f"No training images in {folder}: its metadata.jsonl lists none.")
        for record in records:
            rows.paths.append(folder / record["file_name"])
            rows.texts.append(record["text"])
            rows.weights.append(float(record.get("weight", 1.0)))
            rows.flip_texts.append(record.get("flip_text", record["text"]))
    return rows


def _check_weight(record: dict, where: str) -> None:
    weight = record.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
        raise InvalidInput(f'{where}: "weight" must be a number >= 0 (got {weight!r}).')
    flip_text = record.get("flip_text", "")
    if flip_text is not None and not isinstance(flip_text, str):
        raise InvalidInput(f'{where}: "flip_text" must be a caption or null (got {flip_text!r}).')


def load_image(path: Path, resolution: int, center_crop: bool, rng: np.random.Generator) -> torch.Tensor:
    """(3, R, R) in [-1, 1]: shorter side resized to R (bilinear), then a centre or random R x R crop."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as error:
        raise InvalidInput(f"Cannot read image {path}: {error}") from None
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left, top = int(rng.integers(image.width - resolution + 1)), int(rng.integers(image.height - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


@torch.no_grad()
def encode_images(vae, rows: Rows, config: TrainConfig, resolution: int, device, dtype, flip: bool = False):
    """The VAE's latent distribution (mean, std) of every image, on the CPU in float32."""
    means, stds = [], []
    chunk = max(1, min(32, config.batch_size))
    for start in range(0, len(rows.paths), chunk):
        pixels = torch.stack([load_image(path, resolution, config.center_crop,
                                         np.random.default_rng([config.seed, 3, start + i]))
                              for i, path in enumerate(rows.paths[start:start + chunk])])
        if flip:
            pixels = pixels.flip(-1)
        dist = vae.encode(pixels.to(device, dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def micro_generator(seed: int, index: int, rank: int) -> torch.Generator:
    """The random stream of one micro-batch on one process: the same on a resumed run as on a straight one."""
    state = np.random.SeedSequence([seed, index, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, n: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, epoch]).permutation(n)


def batch_rows(seed: int, n: int, index: int, global_batch: int, offset: int, size: int) -> np.ndarray:
    """Rows of micro-batch `index` for one process: positions [offset, offset + size) of the global batch
    in an endless sequence of shuffled epochs (each epoch a permutation drawn from seed and epoch)."""
    positions = index * global_batch + offset + np.arange(size)
    epochs, places = np.divmod(positions, n)
    rows = np.empty(size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        rows[mask] = _epoch_order(seed, n, int(epoch))[places[mask]]
    return rows


# --- loss -------------------------------------------------------------------------------------------


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet learns to predict, per the scheduler config's prediction_type."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise InvalidInput(f"Cannot train a model with prediction_type {prediction_type!r} (epsilon or v_prediction).")


def drop_prompts(ids: torch.Tensor, empty_ids: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """Token ids with each row replaced by the empty prompt's with probability `share`."""
    if not share:
        return ids  # draws nothing, so runs without dropout keep their random streams
    dropped = torch.rand(len(ids), generator=generator) < share
    return torch.where(dropped[:, None], empty_ids, ids)


def min_snr_weights(noise_scheduler, gamma: float) -> torch.Tensor:
    """Per-timestep loss weight of min-SNR-gamma, expressed for the predicted target (as diffusers does)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, torch.arange(noise_scheduler.config.num_train_timesteps))
    weight = torch.clamp(snr, max=gamma)
    return weight / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weight / snr


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE (mean over C, H, W) times the per-sample weights, then the mean over the batch."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


# --- models -----------------------------------------------------------------------------------------


def _load_components(source: str, entry, unet_dtype: torch.dtype, te_dtype: torch.dtype, vae_dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if entry.is_local and not (Path(source) / "model_index.json").is_file():
        raise ModelNotAvailable(f"Model '{entry.name}' is missing: no pipeline at {source}. {entry.fetch_hint}")
    kwargs = dict(local_files_only=True)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=te_dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=unet_dtype, **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0][:300]
        raise ModelNotAvailable(f"Model '{entry.name}' ({source}) could not be loaded: {reason} "
                                f"{entry.fetch_hint}") from None
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def lora_metadata(model) -> dict:
    """The adapter's LoraConfig as saved next to the weights, so loaders use its rank and alpha."""
    metadata = model.peft_config["default"].to_dict()
    metadata["base_model_name_or_path"] = None  # a temporary path at best; the file names no base
    return metadata


def diffusers_lora_layers(peft_state: dict) -> dict:
    """A peft adapter state dict in the key format `load_lora_weights` reads back in full.

    diffusers' converter renames only the attention projections (to_q.lora_A -> to_q.lora.down) and
    leaves other layers (proj_in, ff.net.2) in peft's form, while its loader converts a dict only when
    the first key is not in peft's form, so a mixed dict silently loses one part on loading. An adapter
    on more than the attention projections therefore keeps peft's keys throughout, which the loader
    takes as they are.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    converted = convert_state_dict_to_diffusers(peft_state)
    if any(".lora_A." in key or ".lora_B." in key for key in converted):
        return dict(peft_state)
    return converted


def has_lora(model) -> bool:
    """Whether the model carries the trainer's LoRA adapter ("default")."""
    return model is not None and "default" in getattr(model, "peft_config", {})


def save_lora(folder: Path | str, unet, text_encoder=None) -> Path:
    """The adapter in diffusers' LoRA format, loadable with `pipe.load_lora_weights(folder)`."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    def layers(model) -> dict:
        # save_embedding_layers=False: no adapter targets embeddings, and "auto" would query the hub.
        return diffusers_lora_layers(get_peft_model_state_dict(model, save_embedding_layers=False))

    has_unet, has_te = has_lora(unet), has_lora(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers(unet) if has_unet else None,
        text_encoder_lora_layers=layers(text_encoder) if has_te else None,
        unet_lora_adapter_metadata=lora_metadata(unet) if has_unet else None,
        text_encoder_lora_adapter_metadata=lora_metadata(text_encoder) if has_te else None,
        safe_serialization=True)
    return Path(folder) / LORA_FILE


def load_lora_state(weights: Path, unet, text_encoder) -> None:
    """Copy a saved adapter into the adapters already on the models (checkpoint resume)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state, _ = StableDiffusionPipeline.lora_state_dict(str(weights.parent), weight_name=weights.name)
    unet_state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()
                                                  if k.startswith("unet.")})
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default") if unet_state else None
    if getattr(result, "unexpected_keys", None):
        raise InvalidInput(f"{weights} does not fit this model's adapter: {result.unexpected_keys[:3]} ...")
    if any(k.startswith("text_encoder.") for k in state):
        _set_state_dict_into_text_encoder(state, prefix="text_encoder.", text_encoder=text_encoder)


def add_lora(config: TrainConfig, unet, text_encoder) -> bool:
    """Put LoRA adapters on the UNet (and text encoder); returns whether the text encoder has one."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    te_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                           target_modules=TEXT_ENCODER_TARGETS)
    if config.init_lora is None:
        if config.train_unet:
            try:
                unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                            target_modules=list(config.target_modules)))
            except ValueError:  # peft: no module of the UNet has one of these names
                raise InvalidInput(f"No UNet layer matches the target modules {', '.join(config.target_modules)}: "
                                   f"use a preset ({', '.join(TARGET_PRESETS)}) or names of the UNet's modules "
                                   f"(e.g. {', '.join(UNET_TARGETS)}).") from None
        if config.train_text_encoder:
            text_encoder.add_adapter(te_config)
        return config.train_text_encoder
    # Continue an existing adapter with its own rank, alpha and target modules.
    from workbench.generation import lora_weights_file, quiet_adapter_report

    weights = lora_weights_file(config.init_lora)
    if weights is None:
        raise InvalidInput(f"init_lora not found: {config.init_lora} (expected a .safetensors file or a folder "
                           f"holding {LORA_FILE}).")
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(weights.parent), weight_name=weights.name, return_lora_metadata=True)
    except (OSError, ValueError) as error:  # safetensors' and diffusers' ways to say "not a LoRA file"
        raise InvalidInput(f"init_lora {weights} is not a readable LoRA (.safetensors in diffusers format): "
                           f"{str(error).splitlines()[0][:200]}") from None
    if config.train_unet:
        if not any(k.startswith("unet.") for k in state):
            raise InvalidInput(f"init_lora {weights} holds no UNet LoRA in diffusers format.")
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="default", metadata=metadata)
    if any(k.startswith("text_encoder.") for k in state):
        with quiet_adapter_report():
            StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder, adapter_name="default",
                                                                metadata=metadata)
        return True
    if config.train_text_encoder:
        text_encoder.add_adapter(te_config)
    return config.train_text_encoder


def _mark_trainable(module, lora: bool) -> None:
    for name, param in module.named_parameters():
        param.requires_grad_(not lora or "lora_" in name)


def params_digest(params: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for param in params:
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- checkpoints ------------------------------------------------------------------------------------


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (trainer_state.json is written last), oldest first."""
    folder = out / "checkpoints"
    found = []
    if folder.is_dir():
        for path in folder.glob("step-*"):
            if path.name[5:].isdigit() and (path / "trainer_state.json").is_file():
                found.append((int(path.name[5:]), path))
    return sorted(found)


def _resumable_checkpoint(config: TrainConfig, out: Path) -> tuple[Path, dict] | None:
    """The last complete checkpoint and its trainer state, after checking it continues this very run."""
    checkpoints = _checkpoints(out)
    if not checkpoints:
        return None
    step, folder = checkpoints[-1]
    state = json.loads((folder / "trainer_state.json").read_text())
    saved, current = state["config"], json.loads(json.dumps(asdict(config)))
    defaults = asdict(TrainConfig(model="", data=[], out=""))  # for settings added after the checkpoint
    changed = [k for k in RUN_IDENTITY if saved.get(k, defaults[k]) != current[k]]
    if (saved.get("ema_decay") is None) != (config.ema_decay is None):
        changed.append("ema_decay")
    if changed:
        raise InvalidInput(f"{folder} is from a run with other settings ({', '.join(changed)}): resume with the "
                           f"same settings, or start afresh (resume=False / --no-resume).")
    if step > config.steps:
        raise InvalidInput(f"{folder} is already past steps={config.steps}: ask for at least {step} steps, or "
                           f"start afresh (resume=False / --no-resume).")
    return folder, state


def _log(message: str) -> None:
    print(message, flush=True)


# --- the loop ---------------------------------------------------------------------------------------


def train(config: TrainConfig, on_progress: Callable[[float, str], None] | None = None,
          should_stop: Callable[[], bool] | None = None, resume: bool = True) -> dict:
    """Fine-tune and write the result under config.out; see the module docstring.

    Writes out/train_config.json, out/log.jsonl (step, loss, lr, seconds every log_every steps) and
    out/checkpoints/step-N (the last 2), then the result: with LoRA out/pytorch_lora_weights.safetensors
    (diffusers format, for `pipe.load_lora_weights(out)`), else out/unet (and out/text_encoder) plus
    out/pipeline, the source pipeline with the trained parts, loadable as a local model.

    Returns {"out", "steps", "loss" (mean of the last log_every steps), "seconds" (training loop time,
    summed over resumes), "lora" (the weights file or None), "stopped"}, plus "unet" and "pipeline"
    for a full fine-tune and "checkpoint" when stopped.

    resume=True continues from the last checkpoint in out/checkpoints when there is one (a run with
    other settings is refused); resume=False starts afresh and removes earlier checkpoints.
    should_stop() is polled after every optimizer step: True saves a checkpoint and returns with
    "stopped": True (in-process, single-process use; under accelerate launch pass nothing).
    """
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from workbench.registry import resolve

    config.validate()
    check_output_folder(Path(config.out).expanduser())  # a file there: said before the images are encoded
    rows = read_rows(config.data)
    entry = resolve(config.model)
    if entry.family != "sd":
        raise InvalidInput(f"The trainer fine-tunes SD-style pipelines (one CLIP text encoder); "
                           f"'{config.model}' is {entry.family}.")
    out = Path(config.out).expanduser()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    # A multi-process launch on a machine without a GPU runs on the CPU (gloo).
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              cpu=cpu)
    try:
        if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
            raise InvalidInput("fp16 mixed precision needs a GPU; on the CPU use bf16 or no.")
        # Batch size and accumulation set the data order, so changing them starts afresh; precision does not.
        smaller = (f"a smaller batch (now {config.batch_size}) and more gradient accumulation (now "
                   f"{config.grad_accum}) by the same factor, which keeps the effective batch.")
        advice = f"Start afresh with {smaller}"
        if accelerator.device.type == "cuda" and accelerator.mixed_precision == "no":
            advice = (f"Use bf16 mixed precision: the run then continues from its last checkpoint in "
                      f"{out / 'checkpoints'}. Or start afresh with {smaller}")
        with out_of_memory_as_message(f"fine-tuning {entry.name} on {accelerator.device}", advice):
            return _train(config, rows, entry, out, accelerator, on_progress, should_stop, resume)
    finally:
        if accelerator.num_processes == 1:
            # The next in-process run may ask for another precision or accumulation: start it clean.
            accelerator.free_memory()
            AcceleratorState._reset_state()
            GradientState._reset_state()


def _train(config: TrainConfig, rows: Rows, entry, out: Path, accelerator, on_progress, should_stop,
           resume: bool) -> dict:
    from diffusers.training_utils import EMAModel, cast_training_params

    main = accelerator.is_main_process
    device = accelerator.device
    resume_from = _resumable_checkpoint(config, out) if resume else None
    # Frozen parts in the compute dtype; what is trained stays in float32 (diffusers' recipe).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    full_te = not config.lora and config.train_text_encoder
    tokenizer, text_encoder, vae, unet, noise_scheduler = _load_components(
        entry.source, entry, unet_dtype=weight_dtype if config.lora else torch.float32,
        te_dtype=torch.float32 if full_te else weight_dtype, vae_dtype=weight_dtype)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise InvalidInput(f"Cannot train a model with prediction_type {noise_scheduler.config.prediction_type!r} "
                           f"(epsilon or v_prediction).")
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = config.resolution or unet.config.sample_size * vae_scale
    if resolution % vae_scale:
        raise InvalidInput(f"resolution must be a multiple of {vae_scale} for this model (got {resolution}).")

    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    te_has_lora = False
    if config.lora:
        with torch.random.fork_rng(devices=[]):  # the LoRA init follows the seed; the caller's RNG is left alone
            torch.manual_seed(config.seed)
            te_has_lora = add_lora(config, unet, text_encoder)
        _mark_trainable(unet, lora=True)
        _mark_trainable(text_encoder, lora=True)
        if not config.train_text_encoder:
            text_encoder.requires_grad_(False)
        cast_training_params([unet, text_encoder], dtype=torch.float32)
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(config.train_text_encoder)
    for module in (vae, text_encoder, unet):
        module.to(device)
    trained = [module for module, on in ((unet, config.train_unet), (text_encoder, config.train_text_encoder)) if on]
    params = [p for module in trained for p in module.parameters() if p.requires_grad]

    # Data: latents of every image once (and of its mirror image for random_flip), captions tokenized once.
    if main:
        _log(f"trainer: {len(rows.paths)} images at {resolution}px, encoding with the VAE")
    if on_progress is not None:
        on_progress(0.0, f"encoding {len(rows.paths)} images")
    latent_mean, latent_std = encode_images(vae, rows, config, resolution, device, weight_dtype)
    if config.random_flip:
        flip_mean, flip_std = encode_images(vae, rows, config, resolution, device, weight_dtype, flip=True)
    input_ids = tokenizer(rows.texts, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    if config.random_flip:
        flip_ids = tokenizer([text if text is not None else "" for text in rows.flip_texts], padding="max_length",
                             max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        flippable = torch.tensor([text is not None for text in rows.flip_texts])
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    sample_weights = torch.tensor(rows.weights, dtype=torch.float32)
    scaling, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    snr_weights = min_snr_weights(noise_scheduler, config.snr_gamma).to(device) if config.snr_gamma else None

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ema = None
    if config.ema_decay is not None:
        ema = EMAModel(params, decay=config.ema_decay)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    prepared = accelerator.prepare(*trained, optimizer)
    optimizer = prepared[-1]
    model = prepared[0] if config.train_unet else unet
    te_model = prepared[-2] if config.train_text_encoder else text_encoder
    unwrap = accelerator.unwrap_model

    if config.lora:  # checkpoints hold the adapter (diffusers format), not the whole UNet
        def save_model_hook(models, weights, output_dir):
            if main:
                save_lora(output_dir, unwrap(model), unwrap(te_model) if te_has_lora else None)
            weights.clear()

        def load_model_hook(models, input_dir):
            models.clear()
            load_lora_state(Path(input_dir) / LORA_FILE, unwrap(model), unwrap(te_model))

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)

    # Resume from the last complete checkpoint (checked before any work above), or start afresh.
    start, elapsed_before, losses = 0, 0.0, []
    if resume_from is not None:
        folder, state = resume_from
        accelerator.load_state(str(folder))
        start, elapsed_before, losses = state["step"], state["seconds"], state.get("losses", [])
        if main:
            _log(f"trainer: resuming from {folder} (step {start}/{config.steps})")
    elif main and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    accelerator.wait_for_everyone()

    log_path = out / "log.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        info = {**asdict(config), "model_source": entry.source, "resolution_used": resolution,
                "rows": len(rows.paths), "num_processes": accelerator.num_processes,
                "global_batch": config.batch_size * accelerator.num_processes * config.grad_accum,
                "trainable_parameters": sum(p.numel() for p in params),
                "prediction_type": noise_scheduler.config.prediction_type,
                "lora_config": {k: lora_metadata(unwrap(model if config.train_unet else te_model))[k]
                                for k in ("r", "lora_alpha", "target_modules")}
                if config.lora else None,
                "versions": {"torch": torch.__version__, "diffusers": _version("diffusers"),
                             "peft": _version("peft"), "accelerate": _version("accelerate")}}
        (out / "train_config.json").write_text(json.dumps(info, indent=2, default=str))
        kept = [line for line in (log_path.read_text().splitlines() if log_path.exists() else [])
                if line.strip() and json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))

    started = time.time()

    def seconds() -> float:
        return elapsed_before + time.time() - started

    def save_checkpoint(done: int) -> Path:
        folder = out / "checkpoints" / f"step-{done}"
        accelerator.save_state(str(folder))  # optimizer, EMA and RNG states; the model through the hooks
        if main:
            state = {"step": done, "seconds": seconds(), "losses": losses, "config": asdict(config)}
            (folder / "trainer_state.json").write_text(json.dumps(state, default=str))  # written last: complete
            for _, old in _checkpoints(out)[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return folder

    n, rank = len(rows.paths), accelerator.process_index
    global_batch = config.batch_size * accelerator.num_processes
    num_timesteps = noise_scheduler.config.num_train_timesteps
    first_timestep = int(round(config.timestep_range[0] * num_timesteps))
    end_timestep = max(first_timestep + 1, int(round(config.timestep_range[1] * num_timesteps)))
    if main:
        _log(f"trainer: {'LoRA' if config.lora else 'full'} fine-tune of {entry.name}, "
             f"{sum(p.numel() for p in params) / 1e6:.3f}M trainable parameters, steps {start}->{config.steps}, "
             f"batch {config.batch_size} x {accelerator.num_processes} process(es) x {config.grad_accum} accumulation")
    model.train()
    te_model.train(config.train_text_encoder)
    done, stopped, loss_value = start, False, float(np.mean(losses)) if losses else float("nan")
    for step in range(start, config.steps):
        lr = config.lr * min(1.0, (step + 1) / config.warmup) if config.warmup else config.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for micro in range(config.grad_accum):
            index = step * config.grad_accum + micro
            generator = micro_generator(config.seed, index, rank)
            picked = torch.from_numpy(batch_rows(config.seed, n, index, global_batch, rank * config.batch_size,
                                                 config.batch_size))
            with accelerator.accumulate(*trained):
                # Latents sampled from the cached distribution, as vae.encode(...).latent_dist.sample() would.
                mean, std, ids = latent_mean[picked], latent_std[picked], input_ids[picked]
                if config.random_flip:
                    flipped = (torch.rand(len(picked), generator=generator) < 0.5) & flippable[picked]
                    mean = torch.where(flipped.view(-1, 1, 1, 1), flip_mean[picked], mean)
                    std = torch.where(flipped.view(-1, 1, 1, 1), flip_std[picked], std)
                    ids = torch.where(flipped.view(-1, 1), flip_ids[picked], ids)
                latents = (mean + std * torch.randn(mean.shape, generator=generator) - shift) * scaling
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.randint(first_timestep, end_timestep, (len(picked),), generator=generator)
                latents, noise = latents.to(device, weight_dtype), noise.to(device, weight_dtype)
                timesteps = timesteps.to(device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                ids = drop_prompts(ids, empty_ids, config.prompt_dropout, generator)

                with torch.set_grad_enabled(config.train_text_encoder):
                    encoder_hidden_states = te_model(ids.to(device), return_dict=False)[0]
                pred = model(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                target = training_target(noise_scheduler, latents, noise, timesteps)
                weights = sample_weights[picked].to(device)
                if snr_weights is not None:
                    weights = weights * snr_weights[timesteps]
                loss = weighted_loss(pred, target, weights)

                step_loss += accelerator.gather(loss.detach()).mean().item() / config.grad_accum
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        done = step + 1
        losses = (losses + [step_loss])[-config.log_every:]
        loss_value = float(np.mean(losses))
        if main and (done % config.log_every == 0 or done == config.steps):
            record = {"step": done, "loss": loss_value, "lr": lr, "seconds": round(seconds(), 3)}
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            _log(f"step {done}/{config.steps} loss {loss_value:.4f} lr {lr:.2e} {seconds():.1f}s")
        if main and on_progress is not None:
            on_progress(done / config.steps, f"step {done}/{config.steps}, loss {step_loss:.4f}")
        stopped = should_stop is not None and should_stop() and done < config.steps
        if stopped or done % config.checkpoint_every == 0 or done == config.steps:
            save_checkpoint(done)
        if stopped:
            break

    # Each replica's digest of its trained weights: equal on every process when data parallelism works.
    if accelerator.num_processes > 1:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "step": done,
                                                           "params_sha256": params_digest(params)}))
    result = {"out": str(out), "steps": done, "loss": loss_value, "seconds": seconds(), "lora": None,
              "stopped": stopped}
    if stopped:
        result["checkpoint"] = str(out / "checkpoints" / f"step-{done}")
        if main:
            _log(f"trainer: stopped at step {done}; train again with resume to continue")
        return result

    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)  # export the averaged weights (the checkpoint above holds the raw ones)
    if config.lora:
        result["lora"] = str(out / LORA_FILE)
        if main:
            save_lora(out, unwrap(model), unwrap(te_model) if te_has_lora else None)
    else:
        result["unet"], result["pipeline"] = str(out / "unet"), str(out / "pipeline")
        if main:
            _save_full(entry, out, unwrap(model), unwrap(te_model) if config.train_text_encoder else None)
    accelerator.wait_for_everyone()
    if main:
        _log(f"trainer: done, {done} steps, loss {loss_value:.4f}, {seconds():.1f}s, output in {out}")
    return result


def _save_full(entry, out: Path, unet, text_encoder) -> None:
    """out/unet (and out/text_encoder), plus out/pipeline: the source pipeline with the trained parts,
    which names the model it came from (it samples with that model's defaults, in its world)."""
    from diffusers import StableDiffusionPipeline

    from workbench.registry import write_fine_tune_origin

    # Saved in float32 whatever the training precision (cast only when needed: diffusers warns on every cast).
    unet = unet if unet.dtype == torch.float32 else unet.to(torch.float32)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    parts = {"unet": unet}
    if text_encoder is not None:
        text_encoder = text_encoder if text_encoder.dtype == torch.float32 else text_encoder.to(torch.float32)
        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        parts["text_encoder"] = text_encoder
    pipe = StableDiffusionPipeline.from_pretrained(entry.source, local_files_only=True, **parts)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    write_fine_tune_origin(out / "pipeline", entry)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


# --- command line -----------------------------------------------------------------------------------


def add_target_modules_argument(parser: argparse.ArgumentParser, default) -> None:
    """The --target-modules option every training command shares (read it with parse_target_modules)."""
    parser.add_argument("--target-modules", default=",".join(default),
                        help="UNet layers the LoRA adapts: " + ", ".join(TARGET_PRESETS) +
                             " (presets) or comma-separated module names")


def refuse_settings_with_resume(parser: argparse.ArgumentParser, args: argparse.Namespace,
                                 allowed: tuple[str, ...] = ()) -> None:
    """--resume continues a run with the settings saved in its folder: a setting also given on the
    command line would be silently ignored (an --iterations 3 that does not extend the run), so it is
    refused, naming it. `allowed`: destinations that may change on resume (say, --review)."""
    ignored = [action.option_strings[0] for action in parser._actions
               if action.option_strings and action.dest not in ("help", "out", "resume", *allowed)
               and getattr(args, action.dest, None) != parser.get_default(action.dest)]
    if ignored:
        parser.error(f"--resume continues the run with the settings saved in its folder; {', '.join(ignored)} "
                     f"would be ignored. Drop {'it' if len(ignored) == 1 else 'them'}, or start a new run in "
                     f"another folder.")


def parse_target_modules(text: str) -> tuple[str, ...]:
    """ "attention", "transformer" (TARGET_PRESETS) or a comma-separated list of UNet module names."""
    if text.strip() in TARGET_PRESETS:
        return TARGET_PRESETS[text.strip()]
    return tuple(m.strip() for m in text.split(",") if m.strip())


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    d = TrainConfig(model="", data=[], out="")
    p = argparse.ArgumentParser(prog="python -m pipelines.trainer", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="registry name (shapes, sd15, ...), local folder or hub id")
    p.add_argument("--data", action="append", required=True, help="imagefolder with metadata.jsonl (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--full", action="store_true", help="full UNet fine-tune instead of LoRA")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    add_target_modules_argument(p, d.target_modules)
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--no-train-unet", action="store_true",
                   help="with --train-text-encoder: a LoRA on the text encoder only, the UNet left as it is")
    p.add_argument("--init-lora", default=None, help="continue training this diffusers-format LoRA")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=d.mixed_precision)
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--snr-gamma", type=float, default=None)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    p.add_argument("--no-center-crop", action="store_true", help="random crops instead of centre crops")
    p.add_argument("--random-flip", action="store_true", help="horizontal flips (break left/right prompts)")
    p.add_argument("--prompt-dropout", type=float, default=d.prompt_dropout,
                   help="share of captions replaced by the empty prompt (Stable Diffusion trained with 0.1)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--no-resume", action="store_true", help="start afresh, removing earlier checkpoints in --out")
    a = p.parse_args(argv)
    config = TrainConfig(
        model=a.model, data=a.data, out=a.out, lora=not a.full, rank=a.rank, alpha=a.alpha,
        target_modules=parse_target_modules(a.target_modules),
        train_text_encoder=a.train_text_encoder, train_unet=not a.no_train_unet, init_lora=a.init_lora, steps=a.steps, batch_size=a.batch_size,
        grad_accum=a.grad_accum, lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm, mixed_precision=a.mixed_precision, ema_decay=a.ema_decay,
        snr_gamma=a.snr_gamma, resolution=a.resolution, center_crop=not a.no_center_crop,
        random_flip=a.random_flip, prompt_dropout=a.prompt_dropout, seed=a.seed, checkpoint_every=a.checkpoint_every, log_every=a.log_every)
    return config, not a.no_resume


def main(argv: list[str] | None = None) -> None:
    config, resume = parse_args(argv)
    try:
        result = train(config, resume=resume)
    except WorkbenchError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped: checkpoints are kept in {config.out}; the same command continues from the last one",
                  file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

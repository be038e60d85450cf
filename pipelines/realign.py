"""RealignDiff's coarse stage (Wu et al., "Towards Better Text-to-Image Generation Alignment via
Attention Modulation" / RealignDiff, arXiv 2305.19599, Sec. 3.1): reward feedback learning (ReFL)
with a caption reward.

    python -m pipelines.realign --model shapes --steps 300 --out DIR

ReFL as ImageReward's trainer does it (THUDM/ImageReward, ImageReward/ReFL.py): draw a batch of
training prompts, run the sampler from pure noise without gradients down to a random step in the
last quarter of the schedule (steps 30..39 of 40 there, 15..19 of 20 here by default), take that one step with gradients, read the
predicted clean latent x0 off the scheduler, decode it and score it. The loss is paper eq. 5:

    L = lambda * ReLU(target - r(x0, prompt)) + L_pretrain

with lambda balancing the two terms' gradients (the paper's 1e-3 with --reward-weight) and L_pretrain the ordinary denoising loss on the model's pre-training data, which
keeps the model from drifting toward whatever fools the reward.

How the gradient flows. The paper's caption reward (eq. 4) captions the image and compares caption and
prompt embeddings; a sampled caption has no gradient. We descend the same captioner's teacher-forced
log-likelihood of the prompt, log p(prompt | x0), which is high exactly when the captioner would say
the prompt of this image and is differentiable in x0 (`workbench.likelihood_reward`: BLIP on real
models, the project's tiny shapes captioner in the shapes world), so target 0 makes the loss the
prompt's negative log-likelihood. With `negatives` = k > 0 the reward is instead the log-softmax of
the prompt's likelihood against k hard negatives (the prompt with colours swapped, the relation
flipped, a count changed...), which only the facts that set the prompt apart can raise (our
addition, against the reward hacking the plain likelihood allows; see ContrastiveLikelihoodReward). The eq. 4 caption reward (`workbench.caption_reward`) is logged
before and after training, so the run reports the reward the paper defines.

The LoRA is trained with the shared engine's pieces (`pipelines.trainer`: components, adapters,
diffusers-format export) in a loop of its own, since each step samples. Checkpoints every
`checkpoint_every` steps (adapter, optimizer, RNG states) make a stopped or crashed run resumable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.benchmark import SHAPESBENCH, BenchmarkConfig, check_run_settings, format_scores, run_benchmark
from workbench.console import ConsoleProgress
from workbench.errors import InvalidInput, WorkbenchError
from workbench.memory import out_of_memory_as_message
from workbench.store import bind_run_config, check_output_folder, read_jsonl, write_json
from workbench.generation import LoraSpec
from workbench.shapes.bench_prompts import training_prompts
from workbench.skills import world_of

STATE_FILE = "refl_state.pt"


@dataclass
class ReFLConfig:
    model: str = "shapes"
    reward: str | None = None  # likelihood reward: None picks the model's world ("shapes" or "blip")
    reward_model: str | None = None  # its weights: None is the shipped shapes captioner / $WORKBENCH_BLIP_MODEL
    # More captioner folders of the same kind (our addition): the reward is the mean of reward_model's and
    # theirs (`workbench.likelihood_reward.EnsembleReward`), so a pixel pattern that fools one captioner
    # earns a share of the reward only, while a change of what is drawn earns it from all of them.
    reward_ensemble: list[str] = field(default_factory=list)
    # 0: the plain likelihood of the prompt. k > 0: its contrast with k hard negatives (the prompt with
    # one fact changed; `workbench.likelihood_reward.ContrastiveLikelihoodReward`), our addition to the
    # paper against reward hacking: pushed hard, the plain likelihood taught the shapes model to paint
    # every object in one of the prompt's colours.
    negatives: int = 0
    prompts: int = 500  # training prompts from the shapes grammar (disjoint from ShapesBench)
    prompt_seed: int = 0
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    rank: int = 8
    alpha: float = 8.0
    # A LoRA on the text encoder too (our addition): the reward's gradient then also reaches how the
    # prompt's words are encoded, the lever that moved IPR's position score on the shapes model.
    train_text_encoder: bool = False
    # False (with train_text_encoder): the text encoder's LoRA alone takes the reward's gradient, and
    # the UNet stays the base model's, so the reward can change how prompts are read but cannot be met
    # by repainting pixels that fool the captioner (pipelines.trainer train_unet).
    train_unet: bool = True
    # lambda of eq. 5. The paper's 1e-3 suits ImageReward-scale rewards; a mean log-likelihood's gradient
    # is far smaller (measured on the shapes model: ~35x below the denoising loss's at lambda 1), so by
    # default (None) lambda is set once, at the first step, to the ratio of the two terms' gradient
    # norms: the reward pulls as hard as the denoising loss holds. The value used is in history.jsonl.
    reward_weight: float | None = None
    reward_target: float = 0.0  # ReLU(target - r); r is a mean log-probability, at most 0
    # ImageReward's ReFL samples 40 steps and takes the gradient step at 30..39, the last quarter; the
    # same quarter of the 20-step schedule the shapes model generates with costs half as much.
    schedule_steps: int = 20
    first_grad_step: int = 15
    # Exclusive upper bound of the drawn gradient step; None: the end of the schedule (ImageReward's choice).
    # A late step can only retouch an image whose layout the gradient-free steps already fixed; an earlier
    # one reaches the layout, but on the shapes model steps 3..9 broke the images (refl-shapes card).
    last_grad_step: int | None = None
    # None: the model's default, so the sampled states look like generation's. On the shapes model, guidance
    # of 3 or more makes the sampled trajectory so sensitive to the weights that one Adam step changes the
    # reward more than the one-step gradient predicts, and the training reward stays flat; at 1 it climbs
    # (bench/refl_landscape.py, refl-shapes card), though ShapesBench did not follow.
    guidance: float | None = None
    # The gradient step's unconditional prediction without gradients (our addition). Through guidance the
    # reward reaches it with weight (1 - guidance), -6.5 at 7.5, so each prompt's reward moves the one
    # prediction that guidance subtracts from every prompt. Detaching it did not stop the shapes model's
    # images from breaking at early gradient steps (refl-shapes card).
    detach_uncond: bool = False
    # Score each decoded image as this many randomly shifted copies (up to 1/16 of its side, edges
    # repeated) and average (our addition; 0: the image as decoded). A pixel gradient that only fools
    # the captioner on one exact image does not survive shifts; one that changes what is drawn does.
    # On the shapes model 4 shifts did not make the training reward rise either (refl-shapes card).
    reward_shifts: int = 0
    # Read each image through a Gaussian blur of this many pixels before scoring (our addition; 0: none).
    # The reward's pixel gradient then has no fine detail, so it can change what is drawn (colours,
    # shapes, counts) but not paint a pattern that only fools the captioner
    # (`workbench.likelihood_reward.BlurredReward`, bench/reward_gradient_alignment.py --blur). On the
    # shapes model, blur 2 at guidance 1 gained nothing either (-0.6 with two seeds; refl-shapes card).
    reward_blur: float = 0.0
    # Score the finished image instead of the gradient step's one-step x0 prediction (our addition): the
    # rest of the schedule is sampled without gradients, and the reward's gradient on the finished image
    # is passed to the x0 prediction unchanged (straight-through; the x0 prediction and the finished
    # image share their layout). A one-step x0 prediction is blurry, the more so the earlier the step,
    # and the shapes captioner misreads blurry images (86% pairwise accuracy on decoded renders against
    # 99% on clean ones), so without this an early gradient step, the one that reaches the layout, is
    # steered by a misread image.
    score_final_image: bool = False
    pretrain_batch: int = 16
    pretrain_data: str | None = None  # imagefolder for real models; the shapes model renders its own
    prompt_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 50
    eval_prompts: str = str(SHAPESBENCH)
    eval_seeds: int = 4  # 0: skip evaluation
    detector: str | None = None  # scores the evaluation; None: the model's own world (shapes model -> shapes)

    def validate(self) -> None:
        from pipelines.trainer import UNTRAINED_UNET_NEEDS_TEXT_ENCODER
        from workbench.registry import resolve

        resolve(self.model)  # a mistyped model first: the checks below depend on which model it is
        checks = [
            (self.steps >= 1, f"ReFL needs at least one training step (got {self.steps})."),
            (self.batch_size >= 1, f"The batch size must be at least 1 (got {self.batch_size})."),
            (self.prompts >= 1, f"ReFL needs at least one training prompt (got {self.prompts})."),
            (self.rank >= 1, f"The LoRA rank must be at least 1 (got {self.rank})."),
            (self.alpha > 0, f"The LoRA alpha must be positive (got {self.alpha})."),
            (self.checkpoint_every >= 1, f"checkpoint_every must be at least 1 (got {self.checkpoint_every})."),
            (self.lr > 0, f"The learning rate must be positive (got {self.lr})."),
            (self.reward_weight is None or self.reward_weight > 0,
             f"The reward weight lambda must be positive, or unset to balance it at step 1 (got {self.reward_weight})."),
            (0 < self.first_grad_step < self.schedule_steps,
             f"first_grad_step must lie inside the {self.schedule_steps}-step schedule."),
            (self.last_grad_step is None or self.first_grad_step < self.last_grad_step <= self.schedule_steps,
             f"last_grad_step must lie after first_grad_step and at most at {self.schedule_steps}."),
            (0 <= self.prompt_dropout < 1, "prompt_dropout must be in [0, 1)."),
            (self.train_unet or self.train_text_encoder,
             UNTRAINED_UNET_NEEDS_TEXT_ENCODER),
            (0 <= self.negatives <= 32, f"negatives must be between 0 and 32 (got {self.negatives})."),
            (0 <= self.reward_shifts <= 16, f"reward_shifts must be between 0 and 16 (got {self.reward_shifts})."),
            (0 <= self.reward_blur <= 8, f"reward_blur must be between 0 and 8 pixels (got {self.reward_blur})."),
            (world_of(self.model) == "shapes" or self.pretrain_data is not None or self.pretrain_batch == 0,
             "A real model needs --pretrain-data (an imagefolder of its pre-training kind of data) for eq. 5's "
             "denoising term, or --pretrain-batch 0 to train on the reward alone."),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message)
        from workbench.likelihood_reward import check_likelihood_reward
        from workbench.perception.backends import check_all

        # Everything missing in one message, before anything is loaded or written.
        checks = [lambda: check_run_settings(self.model, self.eval_prompts, self.eval_seeds, self.detector),
                  lambda: check_likelihood_reward(self.reward_name, self.reward_model, self.reward_ensemble)]
        if self.pretrain_data is not None and self.pretrain_batch > 0:
            from pipelines.trainer import read_rows

            checks.append(lambda: read_rows([self.pretrain_data]))  # reads metadata.jsonl only, no image
        check_all(checks)

    @property
    def reward_name(self) -> str:
        return self.reward or ("shapes" if world_of(self.model) == "shapes" else "blip")

    @classmethod
    def from_dict(cls, data: dict) -> "ReFLConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- pre-training data ------------------------------------------------------------------------------


class ShapesPretrainingData:
    """What the shapes model was trained on: fresh random scenes with noisy web-style alt text."""

    def __init__(self, vae):
        from pipelines.train_shapes import augment_caption, render_batch
        from workbench.shapes.captions import noisy_alt_text
        from workbench.shapes.scene import sample_scene

        self.vae = vae
        self._caption, self._alt, self._render, self._scene = augment_caption, noisy_alt_text, render_batch, sample_scene

    def batch(self, n: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        scenes = [self._scene(rng) for _ in range(n)]
        pixels = self._render(scenes)  # [-1, 1], 8-bit like the model's own training images
        captions = [self._caption(self._alt(s, rng), rng) for s in scenes]
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator)
        return latents, captions


class ImagefolderPretrainingData:
    """Rows of an imagefolder (`metadata.jsonl` with file_name and text), encoded once."""

    def __init__(self, vae, folder: str, resolution: int):
        from pipelines.trainer import TrainConfig, encode_images, read_rows

        rows = read_rows([folder])
        config = TrainConfig(model="", data=[folder], out="")
        self.mean, self.std = encode_images(vae, rows, config, resolution, torch.device("cpu"), torch.float32)
        self.texts = rows.texts

    def batch(self, n: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        idx = torch.from_numpy(rng.integers(len(self.texts), size=n))
        noise = torch.randn(self.mean[idx].shape, generator=generator)
        return self.mean[idx] + self.std[idx] * noise, [self.texts[i] for i in idx]


# --- the run ----------------------------------------------------------------------------------------


def load_with_fresh_lora(config: ReFLConfig):
    """The model's registry entry, its components (frozen, float32) and a fresh LoRA on the UNet and/or the
    text encoder as config says; returns (entry, (tokenizer, text_encoder, vae, unet, noise_scheduler),
    whether the text encoder has a LoRA)."""
    from pipelines.trainer import TrainConfig, _load_components, add_lora
    from workbench.registry import resolve

    entry = resolve(config.model)
    components = _load_components(entry.source, entry, torch.float32, torch.float32, torch.float32)
    _, text_encoder, vae, unet, _ = components
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    te_trained = add_lora(TrainConfig(model=config.model, data=["-"], out="-", rank=config.rank, alpha=config.alpha,
                                      train_text_encoder=config.train_text_encoder, train_unet=config.train_unet),
                          unet, text_encoder)
    return entry, components, te_trained


def guided_noise(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, guidance: float,
                 detach_uncond: bool = False) -> torch.Tensor:
    """The classifier-free guided noise prediction; detach_uncond: its unconditional half without gradients."""
    if detach_uncond:
        with torch.no_grad():
            pred_uncond = unet(x, t, uncond).sample
        pred_cond = unet(x, t, cond).sample
    else:
        pred_uncond, pred_cond = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
    return pred_uncond + guidance * (pred_cond - pred_uncond)


def run_refl(config: ReFLConfig, out_dir: Path, on_progress: Callable[[float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] = print) -> dict:
    """Train (or continue) a ReFL LoRA in out_dir/adapter, then evaluate it; returns the summary."""
    from diffusers import DDIMScheduler

    from pipelines.trainer import drop_prompts, save_lora, training_target
    from workbench.likelihood_reward import get_likelihood_reward

    config.validate()
    out_dir = check_output_folder(out_dir)  # a file there: said before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_same_config(config, out_dir)
    progress = on_progress or (lambda f, m: None)
    adapter_dir = out_dir / "adapter"
    started = time.time()

    if not (adapter_dir / "done").exists():
        torch.manual_seed(config.seed)
        entry, (tokenizer, text_encoder, vae, unet, noise_scheduler), te_trained = load_with_fresh_lora(config)
        params = [p for p in unet.parameters() if p.requires_grad]
        if te_trained:
            params += [p for p in text_encoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr)
        sampler = DDIMScheduler.from_config(noise_scheduler.config)
        sampler.set_timesteps(config.schedule_steps)
        reward = get_likelihood_reward(config.reward_name,
                                       negatives=config.negatives, seed=config.seed, model=config.reward_model,
                                       ensemble=config.reward_ensemble, blur=config.reward_blur)
        pretrain = None
        if config.pretrain_batch:
            pretrain = (ShapesPretrainingData(vae) if config.pretrain_data is None else
                        ImagefolderPretrainingData(vae, config.pretrain_data, entry.default_size))
        guidance = config.guidance if config.guidance is not None else entry.default_guidance
        scaling = vae.config.scaling_factor
        records = training_prompts(config.prompts, seed=config.prompt_seed)
        rng = np.random.default_rng(config.seed)

        def encode(texts: list[str]) -> torch.Tensor:
            return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids

        empty_ids = encode([""])

        def embed(ids: torch.Tensor) -> torch.Tensor:
            # With gradients only where they reach a trained adapter.
            with torch.set_grad_enabled(te_trained):
                return text_encoder(ids)[0]

        start, reward_weight = _load_state(out_dir, unet, optimizer, rng, text_encoder if te_trained else None)
        reward_weight = config.reward_weight or reward_weight
        if start:
            log(f"refl: resuming at step {start}")
        history = []
        unet.train()
        for step in range(start, config.steps):
            prompts = [records[k]["prompt"] for k in rng.integers(len(records), size=config.batch_size)]
            cond = embed(encode(prompts))
            uncond = embed(empty_ids).expand(len(prompts), -1, -1)
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
            latents = torch.randn((len(prompts), unet.config.in_channels, unet.config.sample_size,
                                   unet.config.sample_size), generator=generator) * sampler.init_noise_sigma
            grad_step = int(rng.integers(config.first_grad_step, config.last_grad_step or config.schedule_steps))

            def guided(x: torch.Tensor, t, detach_uncond: bool = False) -> torch.Tensor:
                return guided_noise(unet, x, t, cond, uncond, guidance, detach_uncond)

            @torch.no_grad()
            def sample(x: torch.Tensor, timesteps) -> torch.Tensor:
                for t in timesteps:
                    x = sampler.step(guided(sampler.scale_model_input(x, t), t), t, x).prev_sample
                return x

            # Sample without gradients down to the drawn step, then take that step with gradients.
            latents = sample(latents, sampler.timesteps[:grad_step])
            t = sampler.timesteps[grad_step]
            stepped = sampler.step(guided(sampler.scale_model_input(latents, t), t, config.detach_uncond), t, latents)
            images = vae.decode(stepped.pred_original_sample / scaling).sample
            if config.score_final_image:
                with torch.no_grad():
                    finished = vae.decode(sample(stepped.prev_sample, sampler.timesteps[grad_step + 1:]) / scaling).sample
                images = images + (finished - images).detach()  # the finished image's value, x0's gradient path
            # Hard negatives come from the run's own generator, which checkpoints save, so a resume draws the same.
            scored, scored_prompts = images, prompts
            if config.reward_shifts:
                scored = torch.cat([random_shift(images, generator) for _ in range(config.reward_shifts)])
                scored_prompts = prompts * config.reward_shifts
            r = reward(scored, scored_prompts, rng=rng) if config.negatives else reward(scored, scored_prompts)
            r = r.view(-1, len(prompts)).mean(0)
            reward_loss = F.relu(config.reward_target - r).mean()

            # Eq. 5's pre-training term: the plain denoising loss on pre-training data.
            pretrain_loss = torch.zeros(())
            if pretrain is not None:
                clean, captions = pretrain.batch(config.pretrain_batch, rng, generator)
                clean = clean * scaling
                ids = drop_prompts(encode(captions), empty_ids, config.prompt_dropout, generator)
                states = embed(ids)
                noise = torch.randn(clean.shape, generator=generator)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),),
                                          generator=generator)
                noisy = noise_scheduler.add_noise(clean, noise, timesteps)
                pred = unet(noisy, timesteps, states).sample
                pretrain_loss = F.mse_loss(pred, training_target(noise_scheduler, clean, noise, timesteps))

            if reward_weight is None:
                reward_weight = _balanced_weight(reward_loss, pretrain_loss, params)
                log(f"refl: reward weight lambda = {reward_weight:.4g} (balances the two gradients at step 1)")
            loss = reward_weight * reward_loss + pretrain_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

            history.append({"step": step + 1, "reward": r.mean().item(), "pretrain_loss": pretrain_loss.item(),
                            "grad_step": grad_step, "reward_weight": reward_weight})
            if (step + 1) % 10 == 0 or step + 1 == config.steps:
                recent = history[-10:]
                message = (f"step {step + 1}/{config.steps} reward {np.mean([h['reward'] for h in recent]):.4f} "
                           f"pretrain loss {np.mean([h['pretrain_loss'] for h in recent]):.4f} "
                           f"{time.time() - started:.0f}s")
                log(f"refl: {message}")
                progress(0.8 * (step + 1) / config.steps, message)
            _append_jsonl(out_dir / "history.jsonl", history[-1])
            stopping = should_stop is not None and should_stop()
            if (step + 1) % config.checkpoint_every == 0 or stopping:
                _save_state(out_dir, unet, optimizer, rng, step + 1, reward_weight, text_encoder if te_trained else None)
            if stopping:
                from workbench.jobs import JobCancelled

                raise JobCancelled(f"ReFL stopped at step {step + 1}; resume the run to continue it")
        save_lora(adapter_dir, unet, text_encoder if te_trained else None)
        (adapter_dir / "done").write_text(json.dumps({"seconds": round(time.time() - started, 1)}))
        log(f"refl: adapter written to {adapter_dir}")

    summary = {"status": "done", "run": str(out_dir), "adapter": str(adapter_dir),
               "train_seconds": json.loads((adapter_dir / "done").read_text())["seconds"]}
    if config.eval_seeds:
        for name, loras in (("eval-base", []), ("eval", [LoraSpec(str(adapter_dir), 1.0)])):
            scores_file = out_dir / name / "scores.json"
            if not scores_file.exists():
                bench = BenchmarkConfig(model=config.model, prompts=config.eval_prompts, seeds=config.eval_seeds,
                                        loras=loras, detector=config.detector)
                result = run_benchmark(bench, out_dir / name, on_progress=lambda f, m: progress(0.8 + 0.1 * f, m),
                                       should_stop=should_stop)
                log(f"refl: {'base model' if not loras else 'ReFL adapter'}:\n" + format_scores(result))
            summary[name] = json.loads(scores_file.read_text())
            summary[name]["caption_reward"] = caption_reward_of_run(out_dir / name, config)
            log(f"refl: {name}: caption reward (eq. 4) {summary[name]['caption_reward']:.4f}")
    summary["seconds"] = round(time.time() - started, 1)
    write_json(out_dir / "summary.json", summary)
    return summary


def caption_reward_of_run(eval_dir: Path, config: ReFLConfig) -> float:
    """The mean eq. 4 caption reward of an evaluation's images (cached in caption_reward.json)."""
    from PIL import Image

    from workbench.caption_reward import get_caption_reward

    cached = eval_dir / "caption_reward.json"
    if cached.exists():
        return json.loads(cached.read_text())["mean"]
    rows = read_jsonl(eval_dir / "verdicts.jsonl")
    reward = get_caption_reward("shapes" if world_of(config.model) == "shapes" else "blip")
    scores = reward.score([Image.open(eval_dir / row["path"]).convert("RGB") for row in rows],
                          [row["prompt"] for row in rows])
    mean = float(np.mean(scores.rewards)) if scores.rewards else float("nan")
    cached.write_text(json.dumps({"mean": mean, "images": len(rows)}))
    return mean


# --- bookkeeping ------------------------------------------------------------------------------------


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """images moved by a random offset of up to 1/16 of their side, the edges repeated (differentiable)."""
    size = images.shape[-1]
    pad = max(1, size // 16)
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    return padded[..., dy:dy + size, dx:dx + size]


def _balanced_weight(reward_loss: torch.Tensor, pretrain_loss: torch.Tensor, params: list) -> float:
    """lambda making the reward term's gradient norm equal to the denoising term's (1 without the latter)."""
    if not pretrain_loss.requires_grad:
        return 1.0

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))

    reward_norm = norm(reward_loss)
    return norm(pretrain_loss) / reward_norm if reward_norm > 0 else 1.0


def _save_state(out_dir: Path, unet, optimizer, rng: np.random.Generator, step: int, reward_weight: float,
                text_encoder=None) -> None:
    from peft import get_peft_model_state_dict

    from pipelines.trainer import has_lora

    unet_lora = get_peft_model_state_dict(unet) if has_lora(unet) else {}
    state = {"step": step, "lora": unet_lora, "optimizer": optimizer.state_dict(),
             "rng": json.dumps(rng.bit_generator.state), "reward_weight": reward_weight}
    if text_encoder is not None:
        state["text_encoder_lora"] = get_peft_model_state_dict(text_encoder)
    tmp = out_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out_dir / STATE_FILE)


def _load_state(out_dir: Path, unet, optimizer, rng: np.random.Generator,
                text_encoder=None) -> tuple[int, float | None]:
    from peft import set_peft_model_state_dict

    path = out_dir / STATE_FILE
    if not path.exists():
        return 0, None
    state = torch.load(path, weights_only=True)
    if state["lora"]:
        set_peft_model_state_dict(unet, state["lora"])
    if text_encoder is not None:
        set_peft_model_state_dict(text_encoder, state["text_encoder_lora"])
    optimizer.load_state_dict(state["optimizer"])
    rng.bit_generator.state = json.loads(state["rng"])
    return int(state["step"]), float(state["reward_weight"])


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def _check_same_config(config: ReFLConfig, out_dir: Path) -> None:
    # More or fewer evaluation seeds re-scores the same adapter; the rest must match.
    # `implied`: what runs saved before these settings existed had.
    bind_run_config(out_dir, {"kind": "refl", **asdict(config)}, "a ReFL run", ignore=("eval_seeds",),
                    implied={"negatives": 0, "train_text_encoder": False, "train_unet": True, "last_grad_step": None,
                             "detach_uncond": False, "reward_shifts": 0, "reward_blur": 0.0,
                             "reward_ensemble": [], "detector": None})


# One line per setting for --help; ReFLConfig's comments say why each exists and what it did on the shapes model.
HELP = {
    "model": "registry name (shapes, sd15, sd21, sdxl), diffusers folder or hub id",
    "reward": "likelihood reward model: shapes or blip (default: the model's world)",
    "reward_model": "the reward's weights (default: the shipped shapes captioner, or $WORKBENCH_BLIP_MODEL)",
    "reward_ensemble": "more captioner folders: the reward is the mean of reward_model's and theirs",
    "negatives": "0: the plain likelihood of the prompt; k: its contrast with k hard negatives",
    "prompts": "training prompts drawn from the shapes grammar (disjoint from ShapesBench)",
    "prompt_seed": "seed of the training prompts",
    "steps": "ReFL steps",
    "batch_size": "training prompts per step",
    "lr": "learning rate",
    "rank": "LoRA rank",
    "alpha": "LoRA alpha",
    "train_text_encoder": "also train a LoRA on the text encoder",
    "train_unet": "train the UNet's LoRA (--no-train-unet with --train-text-encoder: the text encoder alone)",
    "reward_weight": "lambda of eq. 5 (default: balanced at step 1 against the denoising loss's gradient; "
                     "the value used is in history.jsonl)",
    "reward_target": "ReLU(target - reward); the reward is a mean log-probability, at most 0",
    "schedule_steps": "sampling steps of the ReFL trajectory",
    "first_grad_step": "first step of the schedule the gradient step is drawn from",
    "last_grad_step": "exclusive end of that window (default: the end of the schedule)",
    "guidance": "guidance of the sampled trajectory (default: the model's own)",
    "detach_uncond": "the gradient step's unconditional prediction without gradients",
    "reward_shifts": "score each image as this many randomly shifted copies (0: as decoded)",
    "reward_blur": "read each image through a Gaussian blur of this many pixels before scoring (0: none)",
    "score_final_image": "score the finished image (straight-through) instead of the one-step x0 prediction",
    "pretrain_batch": "pre-training images per step for eq. 5's denoising term",
    "pretrain_data": "imagefolder of pre-training data for real models (the shapes model renders its own)",
    "prompt_dropout": "share of empty captions in the pre-training term",
    "seed": "training seed",
    "checkpoint_every": "steps between checkpoints (a stopped run continues from the last one)",
    "eval_prompts": "GenEval-format prompt file to evaluate on (default: ShapesBench)",
    "eval_seeds": "seeds per evaluation prompt (0: no evaluation)",
    "detector": "detector backend that scores the evaluation (default: the model's world)",
}


def main(argv: list[str] | None = None) -> int:
    defaults = ReFLConfig()
    parser = argparse.ArgumentParser(prog="python -m pipelines.realign",
                                     description="RealignDiff coarse stage: ReFL with a caption reward.")
    parser.add_argument("--out", type=Path, required=True, help="run folder (the same command continues it)")
    for f in fields(ReFLConfig):
        said = HELP.get(f.name)
        if f.name in ("eval_prompts",):
            parser.add_argument("--eval-prompts", default=defaults.eval_prompts, help=said)
            continue
        if f.name == "reward_ensemble":
            parser.add_argument("--reward-ensemble", nargs="+", default=[], metavar="FOLDER", help=said)
            continue
        if isinstance(getattr(defaults, f.name), bool):
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=getattr(defaults, f.name), help=said)
            continue
        # Settings whose default is None say their type here; the rest take their default's.
        kind = ({"guidance": float, "reward_weight": float, "last_grad_step": int}.get(f.name)
                or {int: int, float: float}.get(type(getattr(defaults, f.name)), str))
        default = getattr(defaults, f.name)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                            help=f"{said} (default: {default})" if said and default is not None else said)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    try:
        config = ReFLConfig.from_dict(args)
        with out_of_memory_as_message(f"running ReFL on {config.model}",
                                      f"Start afresh in a new --out with a smaller --batch-size (now "
                                      f"{config.batch_size}); ReFL keeps a whole denoising step's graph per image."):
            result = run_refl(config, out, on_progress=ConsoleProgress(), log=lambda m: print(m, flush=True))
    except WorkbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stopped: checkpoints are kept in {out}; run the same command again to continue", file=sys.stderr)
        return 130
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("eval")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the shapes world's differentiable captioner (workbench.shapes.caption_model), the reward
model of RealignDiff's coarse stage on the shapes model.

    python -m pipelines.train_shapes_captioner --out assets/models/shapes-captioner

Data, drawn afresh every step: prompts of the training grammar (`training_prompts`, never a
ShapesBench prompt nor one of its held-out colour pairs), each rendered as a scene that satisfies it
(`scene_from_spec`, a new random layout every time). A quarter of the images go through the shapes model's
VAE and back first, so the captioner also knows what decoded (generated) images look like. The loss
is the usual teacher-forced cross-entropy of the prompt's words.

At the end it reports, on held-out prompts, how often the true prompt is more likely than a
corrupted one (another colour, shape, count or the opposite relation): the reward's resolution.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.shapes.bench_prompts import training_prompts, vocabulary
from workbench.shapes.caption_model import CAPTION_MODEL_DIR, CaptionerConfig, CaptionModel, PAD
from workbench.shapes.render import render_array
from workbench.shapes.scene import scene_from_spec
from workbench.shapes.world import COLORS, COUNT_WORDS, SHAPES

SWAPS = {"left": "right", "right": "left", "above": "below", "below": "above", "over": "under", "under": "over"}


def render_batch(records: list[dict], rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    images, prompts = [], []
    for record in records:
        scene = scene_from_spec(record, rng)
        if scene is None:
            continue
        images.append(render_array(scene))
        prompts.append(record["prompt"])
    pixels = torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2)
    return pixels * 2.0 - 1.0, prompts


def corrupt(prompt: str, rng: np.random.Generator) -> str | None:
    """The prompt with one fact changed (colour, shape, count or relation), or None if it has none."""
    words = prompt.split()
    options = []
    for k, word in enumerate(words):
        base = word.rstrip("s") if word.rstrip("s") in SHAPES else word
        if word in COLORS:
            options += [(k, c) for c in COLORS if c != word]
        elif base in SHAPES:
            options += [(k, s + word[len(base):]) for s in SHAPES if s != base]
        elif word in SWAPS:
            options.append((k, SWAPS[word]))
        elif word in COUNT_WORDS.values():
            options += [(k, w) for w in COUNT_WORDS.values() if w not in (word, "one")]
    if not options:
        return None
    k, replacement = options[rng.integers(len(options))]
    return " ".join(words[:k] + [replacement] + words[k + 1:])


@torch.no_grad()
def ranking_accuracy(model: CaptionModel, records: list[dict], seed: int = 123, vae=None) -> float:
    """Share of held-out (image, prompt, corrupted prompt) triples where the true prompt wins."""
    rng = np.random.default_rng(seed)
    images, prompts = render_batch(records, rng)
    if vae is not None:
        images = roundtrip(vae, images)
    pairs = [(i, corrupt(p, rng)) for i, p in enumerate(prompts)]
    pairs = [(i, c) for i, c in pairs if c is not None]
    index = torch.tensor([i for i, _ in pairs])
    true = model.log_likelihood(images[index], [prompts[i] for i, _ in pairs])
    false = model.log_likelihood(images[index], [c for _, c in pairs])
    return float((true > false).float().mean())


@torch.no_grad()
def roundtrip(vae, images: torch.Tensor) -> torch.Tensor:
    latents = vae.encode(images).latent_dist.sample()
    return vae.decode(latents).sample.clamp(-1, 1)


def train(out: Path, steps: int = 4000, batch_size: int = 64, lr: float = 5e-4, seed: int = 0,
          vae_path: str | None = None, log_every: int = 100, bank_size: int = 4096) -> dict:
    from diffusers import AutoencoderKL

    from workbench.registry import resolve

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = training_prompts(8000, seed=seed + 1000)
    seen = {p["prompt"] for p in pool}
    held_out = [r for r in training_prompts(3000, seed=seed + 2000) if r["prompt"] not in seen][:400]
    extra = sorted({w for r in pool for w in re.findall(r"[a-z]+|\d", r["prompt"].lower())})
    config = CaptionerConfig(vocab=sorted(set(vocabulary()) | set(extra)))
    model = CaptionModel(config)
    vae = AutoencoderKL.from_pretrained(vae_path or resolve("shapes").source, subfolder="vae").eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    print(f"captioner: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(pool)} training prompts, {len(held_out)} held out", flush=True)
    started = time.time()
    # Decoded images cost a VAE pass each: a bank of them is made once and a quarter of every batch drawn from it.
    bank_images, bank_prompts = render_batch([pool[k] for k in rng.integers(len(pool), size=bank_size)], rng)
    bank_images = torch.cat([roundtrip(vae, chunk) for chunk in bank_images.split(256)])
    print(f"captioner: {len(bank_images)} decoded images banked, {time.time() - started:.0f}s", flush=True)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        decoded = rng.integers(len(bank_images), size=batch_size // 4)
        records = [pool[k] for k in rng.integers(len(pool), size=batch_size - len(decoded))]
        images, prompts = render_batch(records, rng)
        images = torch.cat([bank_images[torch.from_numpy(decoded)], images])
        prompts = [bank_prompts[k] for k in decoded] + prompts
        images = images + 0.03 * torch.randn_like(images)
        ids, _ = model.tokenizer(prompts)
        logits = model.logits(images, ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
    model.eval()
    facts = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": round(time.time() - started, 1),
             "ranking_accuracy_rendered": ranking_accuracy(model, held_out),
             "ranking_accuracy_decoded": ranking_accuracy(model, held_out, vae=vae)}
    model.save(out)
    (Path(out) / "training.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts), flush=True)
    return facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=CAPTION_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)
    train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, log_every=args.log_every)


if __name__ == "__main__":
    main()

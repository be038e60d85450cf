"""Train the shapes world's differentiable captioner (workbench.shapes.caption_model), the reward
model of RealignDiff's coarse stage on the shapes model.

    python -m pipelines.train_shapes_captioner --negatives 4 --steps 2000 --out assets/models/shapes-captioner

Data, drawn afresh every step: prompts of the training grammar (`training_prompts`, never a
ShapesBench prompt nor one of its held-out colour pairs), each rendered as a scene that satisfies it
(`scene_from_spec`, a new random layout every time). A quarter of the images go through the shapes model's
VAE and back first, so the captioner also knows what decoded (generated) images look like. The loss
is the usual teacher-forced cross-entropy of the prompt's words. With `negatives` = k > 0 a
contrastive term is added: the prompt's total log-probability must beat those of k hard negatives
(`workbench.hard_negatives`: the prompt with colours or objects swapped, the relation flipped, a
colour, object or count replaced). Cross-entropy alone leaves the captioner near chance at telling
"a red circle and a blue square" from "a blue circle and a red square" on generated images
(`bench/captioner_resolution.py`), and a reward that cannot see binding cannot teach it.
`--init` continues from a trained captioner instead of starting afresh; `--generated N` adds N of
the shapes model's own generations, captioned with what the detector finds in them.

At the end it reports, on held-out prompts, how often the true prompt is more likely than a
corrupted one (another colour, shape, count or the opposite relation): the reward's resolution.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.train_shapes import render_batch as render_scenes
from workbench.errors import WorkbenchError
from workbench.shapes.bench_prompts import training_prompts, vocabulary
from workbench.shapes.caption_model import CaptionerConfig, CaptionModel, PAD
from workbench.shapes.scene import scene_from_spec
from workbench.shapes.world import COLORS, COUNT_WORDS, SHAPES

SWAPS = {"left": "right", "right": "left", "above": "below", "below": "above", "over": "under", "under": "over"}


def render_batch(records: list[dict], rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """Each record drawn as a fresh scene that satisfies it: [B, 3, 64, 64] in [-1, 1], as the shapes
    model's VAE and this captioner take images; records no scene can satisfy are skipped."""
    scenes, prompts = [], []
    for record in records:
        scene = scene_from_spec(record, rng)
        if scene is None:
            continue
        scenes.append(scene)
        prompts.append(record["prompt"])
    return render_scenes(scenes), prompts


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


def sequence_log_probs(model: CaptionModel, memory: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Total log-probability of each prompt (EOS included) given its encoded image: [B]."""
    ids, _ = model.tokenizer(prompts)
    logp = F.log_softmax(model.decode(memory, ids).float(), dim=-1)
    target = ids[:, 1:]
    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (picked * (target != PAD).float()).sum(1)


def contrastive_loss(model: CaptionModel, memory: torch.Tensor, prompts: list[str], k: int,
                     rng: np.random.Generator) -> torch.Tensor:
    """-log softmax of each prompt's log-probability among itself and k hard negatives (mean)."""
    from workbench.hard_negatives import hard_negatives
    from workbench.prompt_parser import shapes_vocabulary
    from workbench.shapes.world import MAX_OBJECTS

    vocabulary = shapes_vocabulary()
    negatives = [hard_negatives(p, k, rng, vocabulary, MAX_OBJECTS) for p in prompts]
    has = [i for i, n in enumerate(negatives) if n]
    if not has:
        return memory.new_zeros(())
    texts = [text for i in has for text in [prompts[i]] + negatives[i]]
    scores = sequence_log_probs(model, memory[has].repeat_interleave(k + 1, dim=0), texts).view(len(has), k + 1)
    return -torch.log_softmax(scores, dim=1)[:, 0].mean()


def adversarial_images(images: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor], eps: float,
                       steps: int) -> torch.Tensor:
    """images pushed up loss_of by `steps` normalised gradient steps inside an L2 ball of radius eps (PGD).

    Training on them (adversarial training, Madry et al. 2018) tends to make a model's input gradients
    perceptually aligned (Santurkar et al. 2019): the direction that raises its belief in a caption
    then changes what the image shows. ReFL needs exactly that of its reward: a plainly trained
    captioner reaches near-perfect reward under edits that change little a detector sees
    (`bench/reward_gradient_alignment.py`, which climbs a reward with this function)."""
    start = images.detach()
    x = start.clone()
    step_size = 2.5 * eps / steps
    for _ in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(x), x)
        with torch.no_grad():
            x = x + step_size * grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
            delta = x - start
            delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp(min=1e-12)).clamp(max=1.0).view(-1, 1, 1, 1)
            x = (start + delta).clamp(-1, 1)
    return x.detach()


def generated_bank(n: int, seed: int, model: str = "shapes") -> tuple[torch.Tensor, list[str]]:
    """n of the shapes model's own generations for training-grammar prompts, each with the prompt it
    really satisfies: the prompt where the embedded (exact) detector confirms it, else IPR's relabel of
    it (`workbench.relabel`). Images showing nothing are left out. A reward model should know the
    images it will judge: renders and VAE round trips are cleaner than what the UNet draws."""
    from workbench.generation import GenerationRequest, generate_many
    from workbench.perception.shapes import ShapesDetector
    from workbench.relabel import relabel

    seeds = 2
    records = training_prompts((n + seeds - 1) // seeds, seed=seed)
    requests = [GenerationRequest(r["prompt"], model=model, seeds=list(range(seeds)), batch_size=16) for r in records]
    detector = ShapesDetector()
    images, prompts = [], []
    for k, result in enumerate(generate_many(requests)[:n]):
        detections = detector.detect(result.image)
        if not detections:
            continue
        verdict = relabel(records[k // seeds]["prompt"], detections, result.image.width, result.image.height)
        if not verdict.keep:
            continue  # shows nothing that was asked for: IPR drops such images too
        images.append(np.asarray(result.image.convert("RGB"), dtype=np.float32) / 255.0)
        prompts.append(verdict.prompt)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) * 2.0 - 1.0, prompts


def train(out: Path, steps: int = 4000, batch_size: int = 64, lr: float = 5e-4, seed: int = 0,
          vae_path: str | None = None, log_every: int = 100, bank_size: int = 4096, negatives: int = 0,
          contrastive_weight: float = 1.0, init: str | None = None, generated: int = 0,
          adversarial_eps: float = 0.0, adversarial_steps: int = 3) -> dict:
    from diffusers import AutoencoderKL

    from workbench.registry import resolve
    from workbench.shapes.caption_model import load_caption_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = training_prompts(8000, seed=seed + 1000)
    seen = {p["prompt"] for p in pool}
    held_out = [r for r in training_prompts(3000, seed=seed + 2000) if r["prompt"] not in seen][:400]
    extra = sorted({w for r in pool for w in re.findall(r"[a-z]+|\d", r["prompt"].lower())})
    if init is not None:  # its vocabulary and shape come with it
        model = load_caption_model(init).train()
    else:
        model = CaptionModel(CaptionerConfig(vocab=sorted(set(vocabulary()) | set(extra))))
    vae = AutoencoderKL.from_pretrained(vae_path or resolve("shapes").source, subfolder="vae").eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    print(f"captioner: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(pool)} training prompts, {len(held_out)} held out", flush=True)
    started = time.time()
    # Decoded images cost a VAE pass each: a bank of them is made once and a quarter of every batch drawn from it.
    bank_images, bank_prompts = render_batch([pool[k] for k in rng.integers(len(pool), size=bank_size)], rng)
    bank_images = torch.cat([roundtrip(vae, chunk) for chunk in bank_images.split(256)])
    print(f"captioner: {len(bank_images)} decoded images banked, {time.time() - started:.0f}s", flush=True)
    if generated:  # a quarter of every batch, next to the decoded quarter
        gen_images, gen_prompts = generated_bank(generated, seed=seed + 3000)
        print(f"captioner: {len(gen_images)} generated images banked, {time.time() - started:.0f}s", flush=True)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        decoded = rng.integers(len(bank_images), size=batch_size // 4)
        records = [pool[k] for k in rng.integers(len(pool), size=batch_size - len(decoded))]
        images, prompts = render_batch(records, rng)
        images = torch.cat([bank_images[torch.from_numpy(decoded)], images])
        prompts = [bank_prompts[k] for k in decoded] + prompts
        if generated:
            drawn = rng.integers(len(gen_images), size=batch_size // 4)
            images = torch.cat([gen_images[torch.from_numpy(drawn)], images[: batch_size - len(drawn)]])
            prompts = [gen_prompts[k] for k in drawn] + prompts[: batch_size - len(drawn)]
        images = images + 0.03 * torch.randn_like(images)
        ids, _ = model.tokenizer(prompts)
        # With an attack, one draw of hard negatives per step, shared by the attack and the update.
        negatives_seed = int(rng.integers(2**63)) if adversarial_eps else None

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            memory = model.encode_images(x)
            logits = model.decode(memory, ids)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)
            if negatives:
                drawn = rng if negatives_seed is None else np.random.default_rng(negatives_seed)
                loss = loss + contrastive_weight * contrastive_loss(model, memory, prompts, negatives, drawn)
            return loss

        if adversarial_eps:
            images = adversarial_images(images, loss_of, adversarial_eps, adversarial_steps)
        loss = loss_of(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
    model.eval()
    facts = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "negatives": negatives,
             "contrastive_weight": contrastive_weight, "init": init, "generated": generated,
             "adversarial_eps": adversarial_eps, "adversarial_steps": adversarial_steps, "seconds": round(time.time() - started, 1),
             "ranking_accuracy_rendered": ranking_accuracy(model, held_out),
             "ranking_accuracy_decoded": ranking_accuracy(model, held_out, vae=vae)}
    model.save(out)
    (Path(out) / "training.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts), flush=True)
    return facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train_shapes_captioner",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "))
    # No default: the natural default would be the shipped reward model's folder, and a run left to it
    # would replace that captioner without a word. Rebuilding it means naming it.
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the captioner (assets/models/shapes-captioner rebuilds the shipped one; "
                             "another folder is read by ReFL's --reward-model)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--negatives", type=int, default=0, help="hard negatives per prompt for the contrastive term")
    parser.add_argument("--contrastive-weight", type=float, default=1.0)
    parser.add_argument("--init", default=None, help="continue from this captioner folder")
    parser.add_argument("--bank-size", type=int, default=4096, help="VAE-decoded renders made once and reused")
    parser.add_argument("--generated", type=int, default=0,
                        help="also train on this many of the shapes model's own generations (detector-true captions)")
    parser.add_argument("--adversarial-eps", type=float, default=0.0,
                        help="train on PGD-perturbed images within this L2 radius (pixels in [-1, 1]); 0: off")
    parser.add_argument("--adversarial-steps", type=int, default=3)
    args = parser.parse_args(argv)
    for flag, value, lowest in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                                ("--bank-size", args.bank_size, 1), ("--log-every", args.log_every, 1),
                                ("--negatives", args.negatives, 0), ("--generated", args.generated, 0),
                                ("--adversarial-steps", args.adversarial_steps, 0)):
        if value < lowest:
            parser.error(f"{flag} must be at least {lowest} (got {value})")
    if not args.lr > 0 or args.contrastive_weight < 0 or args.adversarial_eps < 0:
        parser.error("--lr must be positive, --contrastive-weight and --adversarial-eps 0 or more")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out} is a file; give a folder to write into")
    try:
        train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              log_every=args.log_every, negatives=args.negatives, contrastive_weight=args.contrastive_weight,
              init=args.init, bank_size=args.bank_size, generated=args.generated,
              adversarial_eps=args.adversarial_eps, adversarial_steps=args.adversarial_steps)
    except WorkbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("stopped: the captioner keeps no checkpoints; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"wrote the captioner to {args.out}")


if __name__ == "__main__":
    main()

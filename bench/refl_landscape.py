"""Can ReFL's one-step gradient climb the reward at all, and how does guidance change that?

ReFL samples without gradients down to a step t, takes that one step with gradients and follows the
reward of its x0 prediction. The gradient ignores that a change of the LoRA also changes every earlier,
gradient-free step, so it predicts the reward's change only where the sampling trajectory depends
smoothly on the weights. This script removes every other source of noise: one fixed batch of training
prompts, one fixed starting noise, a deterministic DDIM schedule, the reward alone (no pre-training
term). It then takes Adam steps on a fresh LoRA and prints the reward after each, per guidance scale.
On a smooth objective the reward climbs step by step; on a chaotic one it jumps around from the first
step on, however small the learning rate.

Printed per guidance: the reward at each step, the net climb (last minus first) and its ratio to the
summed absolute step-to-step change (1.0: every step went up; near 0: the steps are noise).

    python bench/refl_landscape.py [--guidance 1 3 7.5] [--lr 1e-5] [--grad-step 17] [--steps 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.realign import ReFLConfig, guided_noise, load_with_fresh_lora  # noqa: E402
from workbench.likelihood_reward import get_likelihood_reward  # noqa: E402
from workbench.shapes.bench_prompts import training_prompts  # noqa: E402


def climb(guidance: float, args) -> list[float]:
    from diffusers import DDIMScheduler

    torch.manual_seed(args.seed)
    _, (tokenizer, text_encoder, vae, unet, noise_scheduler), _ = load_with_fresh_lora(ReFLConfig(model=args.model))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    sampler = DDIMScheduler.from_config(noise_scheduler.config)
    sampler.set_timesteps(args.schedule_steps)
    reward = get_likelihood_reward("shapes", model=args.reward_model)

    prompts = [r["prompt"] for r in training_prompts(args.batch, seed=args.seed)]
    ids = tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = text_encoder(ids)[0]
    cond, uncond = states[:-1], states[-1:].expand(len(prompts), -1, -1)
    size = unet.config.sample_size
    noise = torch.randn((len(prompts), unet.config.in_channels, size, size),
                        generator=torch.Generator().manual_seed(args.seed))

    rewards = []
    for _ in range(args.steps + 1):
        x = noise.clone()
        with torch.no_grad():
            for t in sampler.timesteps[:args.grad_step]:
                x = sampler.step(guided_noise(unet, x, t, cond, uncond, guidance), t, x).prev_sample
        t = sampler.timesteps[args.grad_step]
        x0 = sampler.step(guided_noise(unet, x, t, cond, uncond, guidance), t, x).pred_original_sample
        r = reward(vae.decode(x0 / vae.config.scaling_factor).sample, prompts).mean()
        rewards.append(r.item())
        optimizer.zero_grad(set_to_none=True)
        (-r).backward()
        optimizer.step()
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--reward-model", default=None)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.5])
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--grad-step", type=int, default=17)
    parser.add_argument("--schedule-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"fixed batch of {args.batch} training prompts and noises, gradient step {args.grad_step} of "
          f"{args.schedule_steps}, reward only, Adam lr {args.lr}, {args.steps} steps")
    print("| guidance | reward at step 0 | after 1 step | after all | net climb | net / summed abs change |")
    print("|---|---|---|---|---|---|")
    for guidance in args.guidance:
        rewards = climb(guidance, args)
        changes = np.abs(np.diff(rewards)).sum()
        net = rewards[-1] - rewards[0]
        print(f"| {guidance:g} | {rewards[0]:.3f} | {rewards[1]:.3f} | {rewards[-1]:.3f} | {net:+.3f} | "
              f"{net / max(changes, 1e-9):.2f} |", flush=True)
        print("  rewards: " + " ".join(f"{r:.3f}" for r in rewards), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

"""Differentiable caption rewards: how likely a captioner finds the prompt for an image, log p(prompt | image).

RealignDiff's caption reward (eq. 4, `workbench.caption_reward`) captions the image and compares
caption and prompt with a sentence encoder. Sampling a caption is not differentiable, so reward
feedback learning cannot descend it. Teacher forcing the prompt through the same captioner can: the
mean log-probability of the prompt's tokens given the image is high exactly when the captioner
would write the prompt for this image, and its gradient reaches the pixels, hence the decoder, the
UNet step and the LoRA weights. The coarse stage (`pipelines.realign`) descends this reward and logs
the caption reward beside it.

    reward = get_likelihood_reward("shapes")      # the shapes world's own tiny captioner
    reward = get_likelihood_reward("blip")        # BLIP from $WORKBENCH_BLIP_MODEL (local files only)
    r = reward(images, prompts)                   # images [B, 3, H, W] in [-1, 1]; r: [B], differentiable
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from workbench.errors import InvalidInput


class ShapesLikelihoodReward:
    """The shipped shapes captioner (workbench.shapes.caption_model) as a reward."""

    def __init__(self, model: str | None = None, device: str = "cpu"):
        from workbench.shapes.caption_model import load_caption_model

        self.model = load_caption_model(model, device).requires_grad_(False)  # model: its folder

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        size = self.model.config.image_size
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return self.model.log_likelihood(images.float(), prompts)


class BlipLikelihoodReward:
    """BLIP's teacher-forced log-likelihood of the prompt; preprocessing done in torch so gradients pass."""

    def __init__(self, model: str | None = None, device: str | None = None):
        from workbench.perception.blip import load_captioner

        captioner = load_captioner("blip", model=model, device=device, dtype="float32")
        self.model = captioner.model.requires_grad_(False)
        self.processor = captioner.processor
        self.device = captioner.device
        image_processor = self.processor.image_processor
        size = image_processor.size
        self.size = (size["height"], size["width"])
        self.mean = torch.tensor(image_processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = F.interpolate((images.float() + 1) / 2, size=self.size, mode="bicubic", align_corners=False)
        pixels = (pixels.to(self.device) - self.mean) / self.std
        tokens = self.processor.tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
        # BLIP's decoder starts from its BOS token where the tokenizer put [CLS], as in its own training.
        input_ids = tokens.input_ids.clone()
        input_ids[:, 0] = self.model.config.text_config.bos_token_id
        logits = self.model(pixel_values=pixels, input_ids=input_ids, attention_mask=tokens.attention_mask).logits
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        target, mask = input_ids[:, 1:], tokens.attention_mask[:, 1:].float()
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(1) / mask.sum(1).clamp(min=1)


REWARDS: dict[str, Callable[..., object]] = {"shapes": ShapesLikelihoodReward, "blip": BlipLikelihoodReward}


def get_likelihood_reward(name: str, **options):
    if name not in REWARDS:
        raise InvalidInput(f"Unknown reward '{name}'. Available: {', '.join(REWARDS)}.")
    return REWARDS[name](**options)

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
    reward = get_likelihood_reward("shapes", negatives=4)  # contrastive: the prompt against 4 hard negatives

The contrastive form (`negatives` > 0, `ContrastiveLikelihoodReward`) is ours, not the paper's: see
its doc for why the plain likelihood can be gamed.
"""

from __future__ import annotations

import math
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


class BlurredReward:
    """A reward that reads its images through a Gaussian blur of `sigma` pixels (our addition, not the
    paper's). The reward's pixel gradient is then the blur's adjoint (the same blur) applied to the
    captioner's gradient, so it carries no fine detail: climbing it can recolour, move or add shapes,
    not paint the high-frequency pattern that fools a small captioner without changing what is drawn.
    On the shapes model's wrong images, climbing the contrastive reward through a blur of 1 or 2 pixels
    made 15% and 16% of them right at eps 8, against 6.5% without (bench/reward_gradient_alignment.py)."""

    def __init__(self, base, sigma: float):
        if not sigma > 0:
            raise InvalidInput(f"The reward's blur must be more than 0 pixels (got {sigma}).")
        self.base, self.sigma = base, float(sigma)
        self.radius = max(1, math.ceil(3 * self.sigma))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from torchvision.transforms.functional import gaussian_blur

        return self.base(gaussian_blur(images, [2 * self.radius + 1] * 2, [self.sigma] * 2), prompts)


class EnsembleReward:
    """The mean of several captioners' rewards on the same images (our addition, not the paper's).

    A pixel pattern that fools one small captioner is a property of its weights; a change of what is
    drawn fools none of them. Captioners trained alike from different seeds share what the data teach
    and differ in the rest, so the gradient of their mean keeps what they agree on and averages out
    much of what only one of them reads (reward-model ensembles against reward hacking: Coste et al.,
    arXiv 2310.02743). As the mean of log-likelihoods it is the log of a geometric mean of the
    captioners' probabilities, so the contrastive form (ContrastiveLikelihoodReward) wraps it as it
    wraps one captioner."""

    def __init__(self, members: list):
        if len(members) < 2:
            raise InvalidInput(f"An ensemble reward needs at least two captioners (got {len(members)}).")
        self.members = members

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.stack([member(images, prompts) for member in self.members]).mean(0)


class ContrastiveLikelihoodReward:
    """log softmax of the prompt's likelihood against k hard negatives (`workbench.hard_negatives`: the
    prompt with colours or objects swapped, the relation flipped, a colour, object or count changed):

        r = s(prompt) - log(exp s(prompt) + sum_j exp s(negative_j)),   s = n_words * mean log p(. | image)

    The plain likelihood rewards an image for every fact of the prompt it shows, so reward feedback
    learning can raise it by showing the easy facts everywhere: on the shapes world it learned to paint
    all objects in one of the prompt's colours (colours up, colour binding down). A negative that
    differs from the prompt in one fact cancels every fact they share, so only the facts that tell the
    prompt from its negatives earn reward. s is the prompt's total log-probability (mean times words,
    EOS included), so one wrong word weighs the same in short and long prompts. r <= 0, and is 0 only
    when the captioner rules out every negative. A prompt without any editable word gets r = 0: it
    gives no signal rather than a wrong one. New negatives are drawn at each call.
    """

    def __init__(self, base, negatives: int, vocabulary=None, max_count: int = 6, seed: int = 0):
        import numpy as np

        self.base, self.k, self.vocabulary, self.max_count = base, negatives, vocabulary, max_count
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: torch.Tensor, prompts: list[str], rng=None) -> torch.Tensor:
        """rng: draw the negatives from it (a training loop passes its own, so a resumed run draws the same)."""
        from workbench.hard_negatives import hard_negatives

        rng = rng if rng is not None else self.rng
        negatives = [hard_negatives(p, self.k, rng, self.vocabulary, self.max_count) for p in prompts]
        has = [k for k, n in enumerate(negatives) if n]
        reward = images.new_zeros(len(prompts), dtype=torch.float32)
        if not has:
            return reward
        texts = [text for k in has for text in [prompts[k]] + negatives[k]]
        repeated = images[has].repeat_interleave(self.k + 1, dim=0)
        words = torch.tensor([len(t.split()) + 1 for t in texts], dtype=torch.float32, device=images.device)
        scores = (self.base(repeated, texts).float() * words).view(len(has), self.k + 1)
        contrast = torch.log_softmax(scores, dim=1)[:, 0]
        return reward.index_put((torch.tensor(has, device=images.device),), contrast)


REWARDS: dict[str, Callable[..., object]] = {"shapes": ShapesLikelihoodReward, "blip": BlipLikelihoodReward}


def check_likelihood_reward(name: str, model: str | None = None, ensemble: list[str] = ()) -> None:
    """Raise what get_likelihood_reward would for an unknown name or missing weights, loading nothing."""
    if name not in REWARDS:
        raise InvalidInput(f"Unknown reward '{name}'. Available: {', '.join(REWARDS)}.")
    for folder in [model, *ensemble]:
        if name == "blip":
            from workbench.perception.blip import BLIP, check_model

            check_model(BLIP, folder)
        else:
            from workbench.shapes.caption_model import check_caption_model

            check_caption_model(folder)


def get_likelihood_reward(name: str, negatives: int = 0, seed: int = 0, blur: float = 0.0,
                          ensemble: list[str] = (), **options):
    """The likelihood reward `name` ("shapes" or "blip"); with `ensemble` folders, the mean of the
    reward of `model` and of each of theirs (EnsembleReward); with negatives > 0 its contrastive form;
    with blur > 0 read through a Gaussian blur of that many pixels (BlurredReward)."""
    check_likelihood_reward(name, options.get("model"), ensemble)
    if negatives < 0:
        raise InvalidInput(f"The number of hard negatives must be 0 or more (got {negatives}).")
    if blur < 0:
        raise InvalidInput(f"The reward's blur must be 0 or more pixels (got {blur}).")
    base = REWARDS[name](**options)
    if ensemble:
        base = EnsembleReward([base] + [REWARDS[name](**{**options, "model": folder}) for folder in ensemble])
    if blur:
        base = BlurredReward(base, blur)
    if not negatives:
        return base
    if name == "shapes":  # negatives in the words the shapes captioner knows, and counts it can draw
        from workbench.prompt_parser import shapes_vocabulary
        from workbench.shapes.world import MAX_OBJECTS

        return ContrastiveLikelihoodReward(base, negatives, shapes_vocabulary(), MAX_OBJECTS, seed)
    return ContrastiveLikelihoodReward(base, negatives, seed=seed)

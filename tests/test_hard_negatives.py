"""Hard negatives and the contrastive caption reward built on them (workbench.hard_negatives,
workbench.likelihood_reward.ContrastiveLikelihoodReward)."""

import numpy as np
import pytest
import torch

from workbench.hard_negatives import candidate_negatives, hard_negatives
from workbench.prompt_parser import parse_prompt, shapes_vocabulary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = shapes_vocabulary()


def test_negatives_change_one_fact_and_keep_the_prompts_wording():
    prompt = "A photo of an orange triangle under a yellow square, please."
    negatives = candidate_negatives(prompt, SHAPES, max_count=4)
    assert prompt not in negatives and len(negatives) == len(set(negatives))
    # The binding swaps and the flipped relation are there, with articles fixed and punctuation kept.
    assert "A photo of a yellow triangle under an orange square, please." in negatives
    assert "A photo of an orange square under a yellow triangle, please." in negatives
    assert "A photo of an orange triangle over a yellow square, please." in negatives
    for negative in negatives:
        assert negative.startswith("A photo of ") and negative.endswith(", please.")
        assert parse_prompt(negative, SHAPES) != parse_prompt(prompt, SHAPES)  # a different scene
    # Counts change within what the world can draw, the noun stays plural.
    assert set(candidate_negatives("three circles", SHAPES, max_count=4)) == {
        "two circles", "four circles", "three squares", "three triangles"}
    assert "5 dogs" in candidate_negatives("2 dogs")  # COCO classes and digits by default
    # Naming the same objects in another order is no negative; with a count or colour attached it is.
    assert "a triangle and a circle" not in candidate_negatives("a circle and a triangle", SHAPES, 4)
    assert "two triangles and a circle" in candidate_negatives("two circles and a triangle", SHAPES, 4)


def test_k_negatives_prefer_swaps_and_flips_and_nothing_to_edit_gives_none():
    rng = np.random.default_rng(0)
    picked = hard_negatives("a red circle left of a blue square", 3, rng, SHAPES, 4)
    assert sorted(picked) == sorted(["a blue circle left of a red square", "a red square left of a blue circle",
                                     "a red circle right of a blue square"])
    # Fewer edits than asked: they repeat, so every prompt gets k.
    few = hard_negatives("a circle", 5, rng, SHAPES, 4)
    assert len(few) == 5 and set(few) == {"a square", "a triangle"}
    assert hard_negatives("a nice picture", 4, rng, SHAPES, 4) == []


def test_the_contrastive_reward_prefers_the_true_binding_and_reaches_the_pixels():
    from pipelines.train_shapes import render_batch
    from workbench.likelihood_reward import get_likelihood_reward
    from workbench.shapes.scene import Scene, ShapeObject

    scene = Scene((ShapeObject("circle", "red", 18.0, 20.0, 14.0), ShapeObject("square", "blue", 44.0, 44.0, 14.0)))
    image = render_batch([scene])
    images = image.repeat(4, 1, 1, 1).requires_grad_(True)
    prompts = ["a red circle and a blue square", "a blue circle and a red square",
               "a red circle above a blue square", "a nice picture"]
    plain = get_likelihood_reward("shapes")(images, prompts)
    reward = get_likelihood_reward("shapes", negatives=4, seed=0)
    r = reward(images, prompts)
    assert r.shape == (4,) and bool((r[:3] <= 0).all())
    # The image's own binding wins by a margin in the contrastive reward ...
    assert r[0] > r[1] + 1.0 and r[2] > r[1]
    assert r[3] == 0  # no fact to contrast: no signal
    # ... as it does, by less, in the plain likelihood, which the swap leaves near its own level.
    assert plain[0] > plain[1]
    r[:3].sum().backward()
    assert images.grad is not None and images.grad[:3].abs().sum() > 0 and images.grad[3].abs().sum() == 0
    with pytest.raises(Exception, match="hard negatives"):
        get_likelihood_reward("shapes", negatives=-1)


def test_the_captioners_contrastive_term_learns_to_tell_a_prompt_from_its_negatives():
    from pipelines.train_shapes_captioner import contrastive_loss, render_batch, sequence_log_probs
    from workbench.shapes.bench_prompts import training_prompts, vocabulary
    from workbench.shapes.caption_model import CaptionerConfig, CaptionModel

    torch.manual_seed(0)
    model = CaptionModel(CaptionerConfig(vocab=vocabulary(), width=32, heads=2, decoder_layers=1))
    records = [r for r in training_prompts(40, seed=5) if "color" in str(r["include"])][:8]
    images, prompts = render_batch(records, np.random.default_rng(0))
    assert images.min() >= -1 and images.max() <= 1  # the range the VAE decodes to, which the reward reads
    memory = model.encode_images(images)
    # Total log-probability = mean per word x words (EOS included), as the reward's contrast assumes.
    total = sequence_log_probs(model, memory, prompts)
    words = torch.tensor([len(model.tokenizer([p])[0][0]) - 1 for p in prompts], dtype=torch.float32)
    assert torch.allclose(total, model.log_likelihood(images, prompts) * words, atol=1e-4)

    def loss() -> torch.Tensor:  # the same negatives every time
        return contrastive_loss(model, model.encode_images(images), prompts, 3, np.random.default_rng(1))

    before = loss()
    assert before > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss() < 0.5 * before


def test_adversarial_images_raise_the_captioners_loss_within_the_radius():
    from pipelines.train_shapes_captioner import adversarial_images, render_batch
    from workbench.shapes.bench_prompts import training_prompts
    from workbench.shapes.caption_model import load_caption_model

    model = load_caption_model()
    images, prompts = render_batch(training_prompts(8, seed=3), np.random.default_rng(0))

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return -model.log_likelihood(x, prompts).mean()

    edited = adversarial_images(images, loss_of, eps=4.0, steps=3)
    distance = (edited - images).flatten(1).norm(dim=1)
    assert bool((distance <= 4.0 + 1e-3).all()) and bool((distance > 1.0).all())
    assert edited.min() >= -1 and edited.max() <= 1
    with torch.no_grad():
        assert loss_of(edited) > loss_of(images) + 0.1
    assert all(p.grad is None for p in model.parameters())  # the attack leaves the model's gradients alone


def high_frequency_share(grad: torch.Tensor) -> float:
    """The share of a gradient's energy in the upper half of spatial frequencies."""
    spectrum = torch.fft.fft2(grad).abs() ** 2
    freq = torch.fft.fftfreq(grad.shape[-1]).abs()
    high = (freq[:, None] > 0.25) | (freq[None, :] > 0.25)
    return float(spectrum[..., high].sum() / spectrum.sum())


def test_a_reward_read_through_a_blur_still_prefers_the_true_binding_with_a_smooth_pixel_gradient():
    from pipelines.train_shapes import render_batch
    from workbench.errors import InvalidInput
    from workbench.likelihood_reward import get_likelihood_reward
    from workbench.shapes.scene import Scene, ShapeObject

    scene = Scene((ShapeObject("circle", "red", 18.0, 20.0, 14.0), ShapeObject("square", "blue", 44.0, 44.0, 14.0)))
    prompts = ["a red circle and a blue square", "a blue circle and a red square"]
    grads, rewards = {}, {}
    for blur in (0.0, 2.0):
        images = render_batch([scene]).repeat(2, 1, 1, 1).requires_grad_(True)
        r = get_likelihood_reward("shapes", negatives=4, seed=0, blur=blur)(images, prompts)
        r.sum().backward()
        grads[blur], rewards[blur] = images.grad, r.detach()
    assert rewards[2.0][0] > rewards[2.0][1]  # the blurred image is still read right
    # Fine detail in the gradient, what a pattern that only fools the captioner is made of, mostly goes.
    assert high_frequency_share(grads[2.0]) < 0.25 * high_frequency_share(grads[0.0])
    with pytest.raises(InvalidInput, match="blur"):
        get_likelihood_reward("shapes", blur=-1)

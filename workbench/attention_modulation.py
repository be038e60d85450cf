"""RealignDiff's fine-stage attention modulation (arXiv 2305.19599, eqs. 7-10) as a diffusers attention processor.

On every cross-attention layer (the UNet's `attn2`; self-attention keeps its processor) the scores of the
conditional half of the batch are re-weighted before the softmax:

    A' = softmax((QK^T + S * M) / sqrt(d))
    M  = lambda_t * R * M_pos * (1 - B)  -  lambda_t * (1 - R) * M_neg * (1 - B)
    M_pos = max_k QK^T - QK^T,   M_neg = QK^T - min_k QK^T      (per query row, over the keys)

R[i, j] = 1 when query pixel i lies in the region given to text token j; B[j] is that region's share of the
image (DenseDiffusion's size term: big regions are pushed less); S is the strength and
lambda_t = (t / T_train) ** time_power (1: the paper's linear fade, strong early in sampling, 0 at the end).
Tokens without a region (start, end and padding tokens, words of no object) are not modulated: their column
of M is 0. With S * lambda_t = 1 a token's score inside its region is raised to the row's maximum and outside
lowered to the row's minimum; smaller values interpolate towards the plain scores.

How the timestep reaches the processors: `modulate` puts a forward pre-hook on the UNet that reads `timestep`
and the latent size from the UNet's own arguments before each call and stores them in a shared
`ModulationState`. A `callback_on_step_end` runs after a step, too late for the step it would set up, and a
wrapper around the pipeline would have to copy its denoising loop; the hook works with any pipeline that calls
the UNet and is removed with the processors.

Masks are given at image resolution and area-resized to each layer's grid (its height and width follow from the
query length and the latents' aspect). A cell is inside (R = 1) when the region covers at least half of it. At a
coarse layer (4x4 for the shapes model) an object often covers a cell only in part; eq. 8's 1 - R would push the
object's own tokens out of the rest of it. By default (edges="neutral") such partly covered cells are neither
pushed in nor out, and only cells the region does not touch get the M_neg term; where masks align with the grid
this is exactly eq. 8, and edges="outside" gives eq. 8 everywhere. On ShapesBench color_attr (4 seeds, S = 1) it
lifted the fine stage from +8.0 to +13.5 points over plain generation (bench/realign_fine.py).

Where M is zero for the whole batch (S = 0, lambda_t = 0, no regions) the layer's original processor computes
the output, so the image is bit-identical to unmodulated generation. The unconditional half of a
classifier-free guidance batch (the empty prompt) has no regions and is left alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# Function words never get a region: they describe no object, and "a" occurs once per object.
STOP_WORDS = frozenset({"a", "an", "the", "and", "of", "with", "to", "in", "on", "at", "its"})
_WORD = re.compile(r"[^\W_]+")
EDGES = ("outside", "neutral")  # what a cell the region covers in part is, where it is not inside (see region_tensors)


# --- prompt words -> token indices ---------------------------------------------------------------


@dataclass
class TokenRegions:
    """The regions of one prompt's tokens, indexed as the text encoder sees them (start token = 0)."""

    prompt: str
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # token index -> bool (H, W) at image resolution
    tokens: dict[int, str] = field(default_factory=dict)  # token index -> the prompt word it belongs to
    phrases: dict[str, list[int]] = field(default_factory=dict)  # phrase -> the token indices it got
    missing: dict[str, list[str]] = field(default_factory=dict)  # phrase -> its words not found in the prompt

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) of the masks, None without any."""
        return next(iter(self.masks.values())).shape if self.masks else None

    def to_dict(self) -> dict:
        """JSON form without the masks: which tokens each phrase got and how big their regions are."""
        return {"prompt": self.prompt,
                "phrases": {phrase: {"tokens": {str(i): self.tokens[i] for i in indices},
                                     "area": float(self.masks[indices[0]].mean()) if indices else 0.0}
                            for phrase, indices in self.phrases.items()},
                "missing": self.missing}


def _plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _special_layout(tokenizer) -> tuple[int, int]:
    """(special tokens before the text, special tokens in all) as the tokenizer adds them."""
    plain = _plain_ids(tokenizer, "a")
    full = tokenizer("a")["input_ids"]
    return full.index(plain[0]), len(full) - len(plain)


def token_regions(tokenizer, prompt: str, phrases_to_masks: dict[str, np.ndarray]) -> TokenRegions:
    """Give each word of each phrase (e.g. "red circle") found in the prompt its phrase's mask.

    A phrase is matched as a run of consecutive prompt words first, else word by word; each prompt word goes to
    at most one phrase (so "a red circle and a red square" gives each phrase its own "red") and function words
    ("a", "and", ...) get no region. A word's tokens are found by tokenizing the prompt up to the word's start and
    end (CLIP's BPE splits at word boundaries, so a prefix tokenizes as the start of the whole prompt); this
    works with any tokenizer and needs no offset mapping. Tokens cut off by the tokenizer's length limit are
    dropped.
    """
    masks = [np.asarray(m, dtype=bool) for m in phrases_to_masks.values()]
    if len({m.shape for m in masks}) > 1 or any(m.ndim != 2 for m in masks):
        raise ValueError("every region mask must be a 2-D array of the same (image) size")
    words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(prompt)]
    full = _plain_ids(tokenizer, prompt)
    before, n_special = _special_layout(tokenizer)
    limit = (tokenizer.model_max_length or len(full) + n_special) - n_special  # text tokens that fit

    def word_tokens(k: int) -> list[int]:
        _, start, end = words[k]
        n0, upto = len(_plain_ids(tokenizer, prompt[:start])), _plain_ids(tokenizer, prompt[:end])
        if upto != full[:len(upto)]:
            raise ValueError(f"the tokenizer does not split '{prompt}' at word boundaries; cannot place its words")
        return [before + n for n in range(n0, len(upto)) if n < limit]

    regions = TokenRegions(prompt)
    used: set[int] = set()
    for phrase, mask in zip(phrases_to_masks, masks):
        wanted = [w.lower() for w in _WORD.findall(phrase)]
        positions = _find_run(words, wanted, used)
        if positions is None:  # not as a run: take each content word's first free occurrence
            positions = [next((k for k, (w, _, _) in enumerate(words) if w == word and k not in used), None)
                         for word in wanted]
        regions.phrases[phrase] = []
        for word, k in zip(wanted, positions):
            if word in STOP_WORDS:
                continue
            if k is None:
                regions.missing.setdefault(phrase, []).append(word)
                continue
            used.add(k)
            for index in word_tokens(k):
                # A token given two regions (a word in two phrases cannot be, but masks can overlap) gets both.
                regions.masks[index] = regions.masks[index] | mask if index in regions.masks else mask
                regions.tokens[index] = words[k][0]
                regions.phrases[phrase].append(index)
    return regions


def _find_run(words, wanted: list[str], used: set[int]) -> list[int] | None:
    for start in range(len(words) - len(wanted) + 1):
        span = range(start, start + len(wanted))
        if all(words[k][0] == w and k not in used for k, w in zip(span, wanted)):
            return list(span)
    return None


# --- captured attention maps ---------------------------------------------------------------------


@dataclass
class AttentionCapture:
    """Per-token cross-attention maps of the conditional images, before and after modulation.

    Averaged over heads and layers: with `resolution` (a grid height, e.g. 8) only the layers running at that
    grid count; with None every cross-attention layer counts, each resized (bilinear) to the latent grid.
    `before`/`after` are (images, tokens, h, w) arrays averaged over the sampling steps (UNet calls); only
    running sums are kept, since a real model's maps for every step would take hundreds of MB.
    """

    resolution: int | None = None
    _step: int | None = field(default=None, repr=False)
    _layers: list = field(default_factory=list, repr=False)  # this step's [before sum, after sum, layer count]
    _total: list = field(default_factory=list, repr=False)  # [sum of step means before, after, steps]

    def reset(self) -> None:
        """Forget earlier runs: `modulate` calls it, so a capture always holds one run's maps."""
        self._step, self._layers, self._total = None, [], []

    def add(self, step: int, before: torch.Tensor, after: torch.Tensor) -> None:
        if step != self._step:
            self._close_step()
            self._step, self._layers = step, [before.float().clone(), after.float().clone(), 1]
            return
        self._layers[0] += before
        self._layers[1] += after
        self._layers[2] += 1

    def _close_step(self) -> None:
        if not self._layers:
            return
        means = (self._layers[0] / self._layers[2], self._layers[1] / self._layers[2])
        self._total = [means[0], means[1], 1] if not self._total else \
            [self._total[0] + means[0], self._total[1] + means[1], self._total[2] + 1]
        self._layers = []

    def _finished(self) -> None:
        self._close_step()
        if not self._total:
            raise ValueError("nothing was captured: run the pipeline inside modulate(..., capture=...) first")

    @property
    def before(self) -> np.ndarray:
        self._finished()
        return (self._total[0] / self._total[2]).numpy()

    @property
    def after(self) -> np.ndarray:
        self._finished()
        return (self._total[1] / self._total[2]).numpy()


def attention_map_image(capture: AttentionCapture, tokens: dict[int, str], image: int = 0, cell: int = 48) -> Image.Image:
    """A grid for display: one column per token (index -> label), rows before and after modulation.

    Each column is scaled by its own maximum over both rows, so the change a token's map shows is real.
    """
    before, after = capture.before[image], capture.after[image]
    indices = list(tokens)
    label_h = 14
    grid = Image.new("RGB", (cell * max(len(indices), 1) + 48, 2 * cell + label_h), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, label_h + cell // 2 - 5), "before", fill="black")
    draw.text((2, label_h + cell + cell // 2 - 5), "after", fill="black")
    for column, index in enumerate(indices):
        top = max(float(before[index].max()), float(after[index].max()), 1e-12)
        x = 48 + column * cell
        draw.text((x + 2, 1), f"{index}:{tokens[index]}"[:8], fill="black")
        for row, maps in enumerate((before, after)):
            values = np.clip(maps[index] / top * 255.0, 0, 255).astype(np.uint8)
            tile = Image.fromarray(values, "L").resize((cell, cell), Image.NEAREST).convert("RGB")
            grid.paste(tile, (x, label_h + row * cell))
    return grid


# --- the processor -------------------------------------------------------------------------------


class ModulationState:
    """What every modulated layer of one `modulate` context shares: settings, regions, and the current call."""

    def __init__(self, regions: Sequence[TokenRegions | None], strength: float, num_train_timesteps: int,
                 time_power: float = 1.0, capture: AttentionCapture | None = None, pipe=None, edges: str = "neutral"):
        if edges not in EDGES:
            raise ValueError(f"edges must be one of {', '.join(EDGES)}, not {edges!r}")
        self.edges = edges
        self.regions = list(regions)
        self.strength = float(strength)
        self.num_train_timesteps = num_train_timesteps
        self.time_power = time_power
        self.capture = capture
        self.pipe = pipe
        self.step = -1  # UNet calls so far in this context, minus one
        self.lam = 0.0
        self.latent_hw: tuple[int, int] | None = None
        self.image_regions: list[TokenRegions | None] = []  # one per conditional row of the current call
        self.cond_rows: slice = slice(0)
        self._cache: dict[tuple, tuple] = {}

    def before_unet(self, _module, args, kwargs) -> None:
        """UNet forward pre-hook: timestep, latent size and the batch's row layout for this call."""
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(torch.as_tensor(timestep).flatten()[0])
        self.lam = min(max(t / self.num_train_timesteps, 0.0), 1.0) ** self.time_power
        self.latent_hw = tuple(sample.shape[-2:])
        self.step += 1
        total = sample.shape[0]
        cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
        if cfg is None:  # not a diffusers pipeline: a batch twice the number of images is a CFG batch
            cfg = total == 2 * len(self.regions) and total % 2 == 0
        n_images = total // 2 if cfg else total
        self.cond_rows = slice(total - n_images, total)  # diffusers puts the unconditional half first
        per_prompt, rest = divmod(n_images, max(len(self.regions), 1))
        if len(self.regions) == 1:
            self.image_regions = self.regions * n_images
        elif rest == 0 and per_prompt >= 1:  # num_images_per_prompt repeats each prompt's rows in a row
            self.image_regions = [r for r in self.regions for _ in range(per_prompt)]
        else:
            raise ValueError(f"{len(self.regions)} region sets do not fit a batch of {n_images} images")

    @property
    def modulating(self) -> bool:
        return self.strength != 0 and self.lam > 0 and any(r is not None and r.masks for r in self.image_regions)

    def grid(self, query_length: int) -> tuple[int, int]:
        """The (h, w) grid a layer runs at: the latent grid halved (rounding up) until it has query_length cells."""
        height, width = self.latent_hw
        for _ in range(16):
            if height * width == query_length:
                return height, width
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        raise ValueError(f"a cross-attention layer with {query_length} queries fits no grid of the "
                         f"{self.latent_hw} latents")

    def region_tensors(self, hw: tuple[int, int], n_keys: int, device, dtype):
        """R and the cells pushed out, both (images, h*w, keys), and the column weights (1 - B) (images, 1, keys),
        0 for unmodulated tokens.

        Masks are area-resized to the grid and a cell is inside (R = 1) when the region covers half of it; a region
        too small to cover half of any cell keeps its best-covered cell, so no region ever vanishes at a coarse
        layer. Pushed out: every other cell (edges="outside", eq. 8's 1 - R), or only cells the region does not
        touch at all (edges="neutral": a cell the region covers in part is left alone). B is the region's share of
        the full-resolution image.
        """
        key = (hw, n_keys, len(self.image_regions))  # the regions are fixed for the context
        if key not in self._cache:
            h, w = hw
            inside = torch.zeros(len(self.image_regions), h * w, n_keys)
            outside = torch.zeros(len(self.image_regions), h * w, n_keys)
            weight = torch.zeros(len(self.image_regions), 1, n_keys)
            for row, regions in enumerate(self.image_regions):
                for index, mask in (regions.masks.items() if regions is not None else ()):
                    if index >= n_keys or not mask.any():
                        continue
                    pixels = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
                    cover = F.adaptive_avg_pool2d(pixels, (h, w)).flatten()
                    cells = cover >= 0.5
                    if not cells.any():
                        cells = cover == cover.max()
                    inside[row, :, index] = cells.float()
                    outside[row, :, index] = (~cells if self.edges == "outside" else cover == 0).float()
                    weight[row, 0, index] = 1.0 - float(mask.mean())
            self._cache[key] = (inside, outside, weight)
        return tuple(tensor.to(device, dtype) for tensor in self._cache[key])


class ModulatedAttnProcessor:
    """A cross-attention processor that applies the re-weighting modulation and captures maps.

    It wraps the layer's original processor, which still computes the output wherever nothing is modulated.
    """

    def __init__(self, state: ModulationState, original, modulated: bool = True):
        self.state = state
        self.original = original
        self.modulated = modulated  # False: capture only (a layer left out by `layers`)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        state = self.state
        modulating = self.modulated and state.modulating and encoder_hidden_states is not None
        capturing = state.capture is not None and encoder_hidden_states is not None and state.latent_hw
        if not modulating:
            output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            if capturing:
                self._attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, capture_only=True)
            return output
        return self._attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, capture_only=False):
        """diffusers' AttnProcessor, with the scores modulated between QK^T and the softmax."""
        state = self.state
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)

        qk = torch.bmm(query.float(), key.float().transpose(-1, -2))  # (batch * heads, queries, keys)
        scale = attn.scale
        before = qk * scale if attention_mask is None else qk * scale + attention_mask.float()
        heads, n_queries, n_keys = attn.heads, qk.shape[1], qk.shape[2]
        hw = state.grid(n_queries)
        after = before
        if self.modulated and state.modulating:
            inside, outside, weight = state.region_tensors(hw, n_keys, qk.device, qk.dtype)
            rows = state.cond_rows
            qk_cond = qk.view(-1, heads, n_queries, n_keys)[rows]
            push_up = qk_cond.amax(dim=-1, keepdim=True) - qk_cond  # M_pos
            push_down = qk_cond - qk_cond.amin(dim=-1, keepdim=True)  # M_neg
            inside, outside, weight = inside[:, None], outside[:, None], weight[:, None]  # broadcast over heads
            m = state.lam * weight * (inside * push_up - outside * push_down)
            full = torch.zeros_like(qk).view(-1, heads, n_queries, n_keys)
            full[rows] = state.strength * m
            after = before + full.view_as(qk) * scale
        probs_before, probs_after = before.softmax(dim=-1), after.softmax(dim=-1)
        if state.capture is not None:
            self._capture(probs_before, probs_after, heads, hw)
        if capture_only:
            return None

        hidden_states = torch.bmm(probs_after.to(value.dtype), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _capture(self, probs_before, probs_after, heads: int, hw: tuple[int, int]) -> None:
        state, capture = self.state, self.state.capture
        if capture.resolution is not None and hw[0] != capture.resolution:
            return
        maps = []
        for probs in (probs_before, probs_after):
            mean = probs.view(-1, heads, *probs.shape[1:])[state.cond_rows].mean(dim=1)  # (images, queries, keys)
            mean = mean.transpose(1, 2).reshape(mean.shape[0], -1, *hw)  # (images, keys, h, w)
            if capture.resolution is None and hw != state.latent_hw:
                mean = F.interpolate(mean, size=state.latent_hw, mode="bilinear", align_corners=False)
            maps.append(mean.detach().cpu())
        capture.add(state.step, *maps)


def _is_cross_attention(name: str) -> bool:
    return name.endswith("attn2.processor")


def check_layers(unet, layers) -> None:
    """InvalidInput when no cross-attention layer of `unet` starts with one of the `layers` prefixes
    (None: all layers)."""
    cross = [name for name in unet.attn_processors if _is_cross_attention(name)]
    if layers is not None and not any(name.startswith(tuple(layers)) for name in cross):
        from .errors import InvalidInput

        raise InvalidInput(f"No cross-attention layer of the UNet starts with {', '.join(layers)}: nothing would be "
                           f"modulated. Its layers start with " + ", ".join(sorted({n.split('.attn')[0] for n in cross}))
                           + ".")


@contextmanager
def modulate(pipe, regions: TokenRegions | Sequence[TokenRegions | None] | None, strength: float = 1.0, *,
             capture: AttentionCapture | None = None, time_power: float = 1.0,
             layers: Sequence[str] | None = None, edges: str = "neutral") -> Iterator[ModulationState]:
    """Install the modulation on `pipe.unet`'s cross-attention layers for the calls made inside the block.

    `regions`: one TokenRegions for every image, or one per prompt of the batch (None: that prompt unmodulated).
    `layers`: name prefixes of the UNet layers to modulate ("down_blocks", "mid_block", "up_blocks.1", ...);
    None modulates every cross-attention layer. Captured maps come from every cross-attention layer either way.
    `edges`: "neutral" (default) leaves cells a region covers only in part alone, "outside" pushes them out (eq. 8).
    The original processors and no hook are left behind on exit, also when the block raises.
    """
    unet = pipe.unet
    if regions is None or isinstance(regions, TokenRegions):
        regions = [regions]
    if capture is not None:
        capture.reset()
    state = ModulationState(regions, strength, pipe.scheduler.config.num_train_timesteps, time_power, capture, pipe,
                            edges)
    original = dict(unet.attn_processors)
    check_layers(unet, layers)
    installed = {name: (ModulatedAttnProcessor(state, processor,
                                               layers is None or name.startswith(tuple(layers)))
                        if _is_cross_attention(name) else processor)
                 for name, processor in original.items()}
    unet.set_attn_processor(installed)  # set_attn_processor consumes its dict, so it gets its own
    handle = unet.register_forward_pre_hook(state.before_unet, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()
        unet.set_attn_processor(dict(original))


def modulated_generation(pipe, prompt: str | list[str], regions: TokenRegions | Sequence[TokenRegions | None] | None,
                         seed: int | list[int], strength: float = 1.0, capture: AttentionCapture | bool | None = None,
                         *, steps: int | None = None, guidance: float | None = None, width: int | None = None,
                         height: int | None = None, negative_prompt: str = "", time_power: float = 1.0,
                         layers: Sequence[str] | None = None,
                         edges: str = "neutral") -> tuple[list[Image.Image], AttentionCapture | None]:
    """Generate one image per (prompt, seed) pair under the modulation; regions per prompt or one for all.

    Sampling follows the generation service exactly (the model's default scheduler and settings, no adapters,
    CPU generators per seed), so with strength 0 or no regions the images equal `generation.generate`'s.
    Returns the images and the capture (None unless asked for; True means AttentionCapture()).
    """
    from .generation import _pipeline_lock, _set_adapters, _set_scheduler

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        if len(prompts) != 1:
            raise ValueError(f"{len(prompts)} prompts and {len(seeds)} seeds: give one seed per prompt")
        prompts = prompts * len(seeds)
    if isinstance(regions, (list, tuple)) and len(regions) not in (1, len(prompts)):
        raise ValueError(f"{len(regions)} region sets for {len(prompts)} images")
    if capture is True:
        capture = AttentionCapture()
    entry = getattr(pipe, "workbench_entry", None)
    options = {"num_inference_steps": steps or (entry.default_steps if entry else 50),
               "guidance_scale": guidance if guidance is not None else (entry.default_guidance if entry else 7.5)}
    size = entry.default_size if entry else None
    if width or size:
        options["width"] = width or size
    if height or size:
        options["height"] = height or size
    with _pipeline_lock:  # the cached pipeline is shared: no other request may see its processors swapped
        if hasattr(pipe, "workbench_default_scheduler"):
            _set_scheduler(pipe, "default")
            _set_adapters(pipe, [])
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with modulate(pipe, regions, strength, capture=capture or None, time_power=time_power, layers=layers,
                      edges=edges):
            images = pipe(prompt=prompts, negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                          generator=generators, **options).images
    return images, capture or None

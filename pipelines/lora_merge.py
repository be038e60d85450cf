"""Merge LoRA adapters into one fused adapter in diffusers' format, with peft's `add_weighted_adapter`.

Shared by SELMA (skill experts, `pipelines/selma.py`) and IPR (adapters of several seeds averaged,
`pipelines/ipr.py`). Why a "cat" merge and diffusers' `set_adapters` agree: diffusers adds each
active adapter's output, scaled by its weight, so the merged model computes
W x + sum_i w_i s_i B_i A_i x (s_i = alpha_i / r_i). peft's "cat" combination stacks the
w_i s_i A_i and the B_i into one adapter of rank sum(r_i) whose product is exactly that sum;
"linear" instead averages A and B separately (cross terms appear, so it only approximates the sum),
and "ties"/"dare_*" prune and re-sign the factors first.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from pipelines.trainer import diffusers_lora_layers
from workbench.errors import InvalidInput, ModelNotAvailable
from workbench.generation import lora_weights_file, quiet_adapter_report
from workbench.store import write_json

COMBINATIONS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # these read `density`


def merge_experts(model: str, experts: list[str | Path], weights: list[float], out: str | Path,
                  combination: str = "cat", density: float | None = None, seed: int = 0) -> Path:
    """Merge LoRA adapters into one with peft's `add_weighted_adapter` and save it in diffusers' LoRA
    format (`out/pytorch_lora_weights.safetensors`, loadable with `load_lora_weights` or a LoraSpec),
    plus `out/merge.json`. "cat" reproduces `set_adapters(experts, weights)` exactly (rank = sum of
    ranks); see the module docstring for the others. `density` is read by ties, dare_* and
    magnitude_prune; `seed` fixes DARE's random drops. Text-encoder adapters are merged the same way,
    over the experts that have one."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from workbench.registry import resolve

    if combination not in COMBINATIONS:
        raise InvalidInput(f"Unknown combination '{combination}'; use one of {', '.join(COMBINATIONS)}.")
    if not experts or len(weights) != len(experts):
        raise InvalidInput(f"Give one weight per adapter ({len(experts)} adapters, {len(weights)} weights).")
    if combination in PRUNING and not (density is not None and 0 < density <= 1):
        raise InvalidInput(f"{combination} needs a density in (0, 1] (got {density}).")
    files = []
    for expert in experts:
        weights_file = lora_weights_file(str(expert))
        if weights_file is None:
            raise InvalidInput(f"LoRA adapter not found: {expert} (expected a .safetensors file or a folder holding "
                               f"pytorch_lora_weights.safetensors).")
        files.append(weights_file)

    entry = resolve(model)

    def load(component: str):
        kind = UNet2DConditionModel if component == "unet" else CLIPTextModel
        try:
            return kind.from_pretrained(entry.source, subfolder=component, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelNotAvailable(f"Model '{entry.name}' ({entry.source}) could not be loaded: "
                                    f"{str(error).splitlines()[0][:300]} {entry.fetch_hint}") from None

    # Each file is read once, as load_lora_weights reads it (state dict, alphas, adapter metadata), and
    # each model takes its part of it.
    loaded = {weights_file: StableDiffusionPipeline.lora_state_dict(str(weights_file.parent),
                                                                    weight_name=weights_file.name,
                                                                    return_lora_metadata=True)
              for weights_file in files}

    def read_unet_expert(reader, name: str, weights_file: Path) -> bool:
        state, alphas, metadata = loaded[weights_file]
        if not any(key.startswith("unet.") for key in state):
            return False  # a text-encoder-only adapter (trainer's train_unet=False)
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, reader, adapter_name=name, metadata=metadata)
        return True

    def read_text_encoder_expert(reader, name: str, weights_file: Path) -> bool:
        state, alphas, metadata = loaded[weights_file]
        if not any(key.startswith("text_encoder.") for key in state):
            return False  # a UNet-only expert: set_adapters leaves the text encoder to the others too
        with quiet_adapter_report():
            StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, reader, prefix="text_encoder",
                                                                adapter_name=name, metadata=metadata)
        return True

    unet_merged = _merge_component(lambda: load("unet"), read_unet_expert, files, weights,
                                   combination, density, seed, f"{entry.name}'s UNet")
    te_merged = _merge_component(lambda: load("text_encoder"), read_text_encoder_expert, files, weights,
                                 combination, density, seed, f"{entry.name}'s text encoder")

    def layers_and_metadata(merged):
        if merged is None:
            return None, None
        state, lora_config = merged
        layers = diffusers_lora_layers({k.removeprefix("base_model.model."): v.contiguous()
                                        for k, v in state.items()})
        metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}
        metadata["base_model_name_or_path"] = None
        return layers, metadata

    unet_layers, unet_metadata = layers_and_metadata(unet_merged)
    te_layers, te_metadata = layers_and_metadata(te_merged)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=unet_layers, unet_lora_adapter_metadata=unet_metadata,
                                              text_encoder_lora_layers=te_layers,
                                              text_encoder_lora_adapter_metadata=te_metadata, safe_serialization=True)
    write_json(out / "merge.json", {"combination": combination, "weights": [float(w) for w in weights],
                                     "experts": [str(e) for e in experts],
                                     "rank": unet_merged[1].r if unet_merged else None,
                                     "text_encoder_rank": te_merged[1].r if te_merged else None,
                                     "density": density if combination in PRUNING else None, "seed": seed})
    return out


def _merge_component(load_clean, read_expert, files: list[Path], weights: list[float], combination: str,
                     density: float | None, seed: int, label: str):
    """One model's (UNet's or text encoder's) merge: (peft state dict, LoraConfig) of the merged adapter, or
    None when no expert adapts this model. Experts that do not adapt it are left out, as set_adapters does."""
    import copy

    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    # diffusers reads each file (format, rank, alpha) into one model; peft then holds every expert as a
    # named adapter of a PeftModel on a clean copy, which is what add_weighted_adapter works on.
    reader = load_clean()
    names, kept_weights, kept_files = [], [], []
    with warnings.catch_warnings():  # peft warns on every adapter after the first; several are the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for i, (weights_file, weight) in enumerate(zip(files, weights)):
            if read_expert(reader, f"expert_{i}", weights_file):
                names.append(f"expert_{i}")
                kept_weights.append(weight)
                kept_files.append(weights_file)
    if not names:
        return None
    configs = {name: copy.deepcopy(reader.peft_config[name]) for name in names}
    states = {name: get_peft_model_state_dict(reader, adapter_name=name, save_embedding_layers=False) for name in names}
    del reader  # one copy of the model in memory at a time (SD's UNet is 3.4 GB in float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        peft_model = get_peft_model(load_clean(), configs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, configs[name])
    for name, weights_file in zip(names, kept_files):
        loaded = set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": v for k, v in states[name].items()},
                                           adapter_name=name)
        if getattr(loaded, "unexpected_keys", None):
            raise InvalidInput(f"{weights_file} does not fit {label}: {loaded.unexpected_keys[:3]} ...")
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # DARE drops at random: seeded
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            torch.manual_seed(seed)
            peft_model.base_model.add_weighted_adapter(names, [float(w) for w in kept_weights], "merged",
                                                       combination_type=combination,
                                                       density=density if combination in PRUNING else None)
    except ValueError as error:  # e.g. linear/ties need equal ranks
        raise InvalidInput(f"Cannot merge these adapters with {combination}: {error}") from None
    return (get_peft_model_state_dict(peft_model, adapter_name="merged", save_embedding_layers=False),
            peft_model.peft_config["merged"])

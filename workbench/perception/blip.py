"""BLIP and BLIP-2 captioners (backends "blip" and "blip2") through transformers, weights from disk only.

The models are transformers' `BlipForConditionalGeneration` (default Salesforce/blip-image-captioning-large,
$WORKBENCH_BLIP_MODEL) and `Blip2ForConditionalGeneration` (default Salesforce/blip2-opt-2.7b,
$WORKBENCH_BLIP2_MODEL), each with its processor, read with `local_files_only=True` from safetensors in a
local folder or the Hugging Face cache; a missing model raises ModelNotAvailable saying what to fetch.

What the two caption modes do (both beam search, 3 beams, so a caption is reproducible):
- "short": the model's plain caption, no prompt, at most 20 new tokens (BLIP's own captioning setting):
  the objects, e.g. "a cat sitting on a couch".
- "long": conditional captioning with a prefix, at least 15 and at most 60 new tokens, no 3-gram twice
  (forcing length otherwise makes the decoder loop). BLIP's prefix is "a picture of", the prompt its
  captioner was fine-tuned with, so the model continues it fluently instead of parroting an unknown one;
  BLIP-2's is "Question: Describe this image in detail. Answer:", the question format of the BLIP-2 paper
  its language model answers. The prefix is cut from the output (by tokens, so the caption is only what
  the model wrote). `long_prompt=` replaces the prefix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from workbench.errors import InvalidInput, ModelNotAvailable


@dataclass(frozen=True)
class Family:
    """What differs between BLIP and BLIP-2: names, defaults and the long-mode prefix."""

    backend: str
    title: str
    env: str
    default: str
    long_prompt: str
    model_class: str
    processor_class: str


BLIP = Family("blip", "BLIP", "WORKBENCH_BLIP_MODEL", "Salesforce/blip-image-captioning-large", "a picture of",
              "BlipForConditionalGeneration", "BlipProcessor")
BLIP2 = Family("blip2", "BLIP-2", "WORKBENCH_BLIP2_MODEL", "Salesforce/blip2-opt-2.7b",
               "Question: Describe this image in detail. Answer:", "Blip2ForConditionalGeneration", "Blip2Processor")
FAMILIES = {family.backend: family for family in (BLIP, BLIP2)}

MODES = ("short", "long")
GENERATION = {
    "short": {"num_beams": 3, "max_new_tokens": 20},
    "long": {"num_beams": 3, "min_new_tokens": 15, "max_new_tokens": 60, "no_repeat_ngram_size": 3},
}


def model_name(family: Family) -> str:
    """The model a family uses: its environment variable (hub id in the HF cache or local folder), else the default."""
    return os.environ.get(family.env) or family.default


# --- finding and loading the model --------------------------------------------------------------


def _is_local(name: str) -> bool:
    path = Path(name).expanduser()
    return path.is_dir() or path.is_absolute() or name.startswith((".", "~"))


def _missing_message(family: Family, name: str, where: str) -> str:
    saved = (f"a {family.title} captioning model saved by transformers ({family.model_class}: config.json, "
             f"model.safetensors or its shards, tokenizer and preprocessor files)")
    if _is_local(name):
        fetch = (f"Point {family.env} at a folder holding {saved}, e.g. one made with "
                 f"`hf download {family.default} --local-dir {name}`, or unset it to use {family.default} "
                 f"from the Hugging Face cache.")
    else:
        fetch = (f"Download it once with `hf download {name}` (it goes to the Hugging Face cache, "
                 f"~/.cache/huggingface/hub or $HF_HOME), or set {family.env} to a local folder holding {saved}.")
    return (f"The {family.title} captioner (backend '{family.backend}') needs the model '{name}', which is not "
            f"on this machine ({where}). {fetch}")


def check_model(family: Family, name: str | None = None) -> None:
    """Raise ModelNotAvailable when the model's config or safetensors weights are not on disk (nothing loaded)."""
    name = str(name or model_name(family))
    weights = ("model.safetensors", "model.safetensors.index.json")  # one file, or sharded (BLIP-2)
    if _is_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelNotAvailable(_missing_message(family, name, f"no folder {path}"))
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(_missing_message(family, name, f"{path} has no config.json"))
        if not any((path / file).is_file() for file in weights):
            raise ModelNotAvailable(_missing_message(family, name, f"{path} has no model.safetensors"))
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelNotAvailable(_missing_message(family, name, "no config.json for it in the Hugging Face cache"))
    if not any(isinstance(try_to_load_from_cache(name, file), str) for file in weights):
        raise ModelNotAvailable(_missing_message(family, name, "no safetensors weights for it in the HF cache"))


def load_captioner(backend: str, model: str | None = None, device: str | None = None, dtype: str | None = None,
                   long_prompt: str | None = None) -> BlipCaptioner:
    """A BLIP ("blip") or BLIP-2 ("blip2") captioner from a local folder or the HF cache, never the network."""
    family = FAMILIES[backend]
    name = str(model or model_name(family))
    check_model(family, name)
    import transformers

    from workbench.config import get_settings
    from workbench.devices import pick_device, pick_dtype

    transformers.utils.logging.disable_progress_bar()  # loading bars would flood the CLI and job logs
    settings = get_settings()
    where = pick_device(device or settings.device)
    torch_dtype = pick_dtype(where, dtype or settings.dtype)
    source = str(Path(name).expanduser()) if _is_local(name) else name
    try:
        network = getattr(transformers, family.model_class).from_pretrained(
            source, local_files_only=True, use_safetensors=True, dtype=torch_dtype)
        processor = getattr(transformers, family.processor_class).from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:  # huggingface_hub's not-found errors are OSErrors
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        raise ModelNotAvailable(_missing_message(family, name, f"loading it failed: {reason}")) from None
    return BlipCaptioner(network, processor, family, long_prompt=long_prompt, device=where, name=name)


# --- captioning ---------------------------------------------------------------------------------


class BlipCaptioner:
    """A loaded BLIP or BLIP-2 with `caption(image, mode)` and the batched `caption_many(images, mode)`."""

    def __init__(self, model, processor, family: Family, long_prompt: str | None = None,
                 device: torch.device | str = "cpu", name: str = ""):
        self.model = model.eval().to(device)
        self.processor = processor
        self.family = family
        self.long_prompt = long_prompt if long_prompt is not None else family.long_prompt
        self.device = torch.device(device)
        self.name = name
        if family is BLIP2:
            self._check_image_tokens()

    def _check_image_tokens(self) -> None:
        # BLIP-2 prompts carry one <image> token per query token; snapshots saved before transformers
        # learned that have no count in the processor, and a different token id means the text would
        # be read in place of the image: refuse rather than caption garbage.
        config = self.model.config
        if getattr(self.processor, "num_query_tokens", None) is None:
            self.processor.num_query_tokens = config.num_query_tokens
        image_token = getattr(self.processor.image_token, "content", self.processor.image_token)
        if self.processor.tokenizer.convert_tokens_to_ids(image_token) != config.image_token_id:
            raise ModelNotAvailable(
                f"The BLIP-2 model '{self.name}' has a tokenizer whose image token does not match its config "
                f"(an old snapshot). Download it again with `hf download {self.name}` or point {self.family.env} "
                f"at a folder saved by transformers 5.")

    def caption(self, image: Image.Image, mode: str = "short") -> str:
        return self.caption_many([image], mode)[0]

    @torch.no_grad()
    def caption_many(self, images: Sequence[Image.Image], mode: str = "short", batch_size: int = 8) -> list[str]:
        """One caption per image, in order; batches of `batch_size` go through the model together."""
        if mode not in MODES:
            raise InvalidInput(f"Caption mode must be 'short' or 'long', not {mode!r}.")
        captions: list[str] = []
        dtype = next(self.model.parameters()).dtype
        for start in range(0, len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start:start + batch_size]]
            inputs, skip = self._inputs(batch, mode)
            inputs = {key: value.to(self.device) for key, value in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            output = self.model.generate(**inputs, **GENERATION[mode])
            texts = self.processor.batch_decode(output[:, skip:], skip_special_tokens=True)
            captions += [" ".join(text.split()) for text in texts]
        return captions

    def _inputs(self, batch: list[Image.Image], mode: str) -> tuple[dict, int]:
        """The model's inputs and how many leading output tokens are the prompt, not the caption."""
        prompt = self.long_prompt if mode == "long" else ""
        if self.family is BLIP:
            if not prompt:  # BLIP starts from its own decoder token: one leading token to drop
                return dict(self.processor(images=batch, return_tensors="pt")), 1
            inputs = dict(self.processor(images=batch, text=[prompt] * len(batch), return_tensors="pt"))
            # BLIP swaps [CLS] for its decoder token and drops the final [SEP]; the rest comes back first.
            return inputs, inputs["input_ids"].shape[1] - 1
        inputs = dict(self.processor(images=batch, text=[prompt] * len(batch), return_tensors="pt"))
        # A decoder-only language model (OPT) returns the prompt (image tokens included) before its
        # answer; an encoder-decoder one (Flan-T5) returns the answer alone.
        decoder_only = not getattr(self.model.config.text_config, "is_encoder_decoder", False)
        return inputs, inputs["input_ids"].shape[1] if decoder_only else 0

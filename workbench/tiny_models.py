"""Tiny, randomly initialised Stable Diffusion / SDXL pipelines built from configs.

Tests and benchmarks use them to exercise the real loading code (save_pretrained to a folder, then
load through the registry) without any download. Configs follow diffusers' own pipeline tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizer import build_word_tokenizer

TINY_WORDS = ["a", "an", "the", "of", "and", "photo", "red", "green", "blue", "circle", "square",
              "triangle", "cat", "dog", "left", "right", "above", "below"]


def _clip_config(vocab_size: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                          intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                          num_hidden_layers=2, vocab_size=vocab_size, **extra)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2)


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=2,
        attention_head_dim=4)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_clip_config(len(tokenizer))), tokenizer=tokenizer,
        unet=unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                           steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=2)
    config = _clip_config(len(tokenizer), projection_dim=32, hidden_act="gelu")
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, timestep_spacing="leading"))
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_tiny_lora(pipeline_folder: Path, out_folder: Path, rank: int = 4, seed: int = 1) -> Path:
    """A LoRA on the UNet attention layers with non-zero weights, saved in diffusers' LoRA format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline_folder, subfolder="unet")
    # init_lora_weights=False draws both LoRA matrices at random, so the adapter changes outputs.
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out_folder, unet_lora_layers=layers, safe_serialization=True)
    return Path(out_folder)

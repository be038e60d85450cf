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


def build_tiny_lora(pipeline_folder: Path, out_folder: Path, rank: int = 4, seed: int = 1,
                    text_encoder: bool = False, target_modules=None, unet: bool = True) -> Path:
    """A LoRA on the UNet's `target_modules` (default: the attention layers; none with unet=False) and
    the text encoder's attention, if asked, with non-zero weights, saved in diffusers' LoRA format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    from pipelines.trainer import TEXT_ENCODER_TARGETS, UNET_TARGETS, diffusers_lora_layers

    torch.manual_seed(seed)
    layers = None
    if unet:
        model = UNet2DConditionModel.from_pretrained(pipeline_folder, subfolder="unet")
        # init_lora_weights=False draws both LoRA matrices at random, so the adapter changes outputs.
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                     target_modules=list(target_modules or UNET_TARGETS)))
        layers = diffusers_lora_layers(get_peft_model_state_dict(model))
    te_layers = None
    if text_encoder:
        te = CLIPTextModel.from_pretrained(pipeline_folder, subfolder="text_encoder")
        te.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                  target_modules=list(TEXT_ENCODER_TARGETS)))
        te_layers = diffusers_lora_layers(get_peft_model_state_dict(te))
    StableDiffusionPipeline.save_lora_weights(out_folder, unet_lora_layers=layers, text_encoder_lora_layers=te_layers,
                                              safe_serialization=True)
    return Path(out_folder)


# --- tiny perception models (GroundingDINO, SAM): random weights saved as the released files are ---

TINY_BERT_WORDS = ["a", "cat", "dog", "person", "car", "red", "blue", "traffic", "light", "circle", "square"]


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 1-layer BERT with a WordPiece vocabulary of a few words, saved like bert-base-uncased."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"]
    (folder / "vocab.txt").write_text("\n".join(special + TINY_BERT_WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(special) + len(TINY_BERT_WORDS), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    return folder


def build_tiny_groundingdino(folder: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """(config .py, checkpoint .pth, BERT folder) of a random GroundingDINO with 1 encoder/decoder layer.

    The backbone stays Swin-T (the smallest groundingdino-py builds) and the hidden size 256 (its text
    position embedding is fixed at 256); layers, feed-forward width and queries shrink. The checkpoint
    is written as the released one is: {"model": state_dict}.
    """
    from workbench.perception.groundingdino import build_model, load_text_encoder, packaged_config

    folder = Path(folder)
    bert = build_tiny_bert(folder / "bert", seed)
    config = folder / "GroundingDINO_tiny.py"
    config.write_text(packaged_config().read_text() + "\n# tiny test model\nenc_layers = 1\ndec_layers = 1\n"
                      "dim_feedforward = 64\nnum_queries = 20\n")
    torch.manual_seed(seed)
    model = build_model(config, *load_text_encoder(str(bert)))
    checkpoint = folder / "groundingdino_tiny.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    return config, checkpoint, bert


def tiny_sam_architecture():
    """A SAM with a 2-block 32-wide ViT on 64x64 inputs (the released ones: 1024x1024, 768+ wide)."""
    from workbench.perception.sam import SamArchitecture

    return SamArchitecture(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                           image_size=64, patch_size=16, window_size=2, prompt_embed_dim=32, decoder_depth=1,
                           decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)


def build_tiny_sam(folder: Path, seed: int = 0) -> Path:
    """A random tiny SAM's state_dict saved as the released checkpoints are (a plain state_dict)."""
    from workbench.perception.sam import build_sam

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "sam_tiny.pth"
    torch.save(build_sam(tiny_sam_architecture()).state_dict(), checkpoint)
    return checkpoint


# --- tiny CLIP (evaluation metrics: GenEval's colour classifier, CLIPScore) ----------------------

TINY_CLIP_WORDS = ["a", "photo", "of", "colored", "object", "red", "orange", "yellow", "green", "blue", "purple",
                   "pink", "brown", "black", "white", "circle", "square", "triangle", "cat", "dog", "car"]


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer CLIPModel on 32x32 images, with its tokenizer and image processor, saved like
    openai/clip-vit-large-patch14 is (config.json, model.safetensors, tokenizer and preprocessor files)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(TINY_CLIP_WORDS, model_max_length=77)
    text = _clip_config(len(tokenizer), max_position_embeddings=77)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=8, layer_norm_eps=1e-05)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder

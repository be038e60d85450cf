"""Segment Anything (SAM): one mask per detected box, through the `segment-anything` package.

The model is built without weights (the package's own builders for vit_b / vit_l / vit_h) and the
checkpoint is loaded here with `torch.load(weights_only=True)`: the package's builders would
`torch.load` it with full unpickling. An explicit `SamArchitecture` builds other sizes (tests use a
tiny one).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from workbench.errors import InvalidInput, ModelNotAvailable
from workbench.perception.base import Box
from workbench.perception.checkpoints import Missing, load_state_dict, raise_if_missing

SAM_PIP = "segment-anything==1.0"
# The released checkpoint of each model type (links in the segment-anything README).
CHECKPOINT_NAMES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class SamArchitecture:
    """The sizes `segment_anything.build_sam` fixes, open to change (defaults: the released models')."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256


def build_sam(architecture: SamArchitecture):
    """A randomly initialised SAM of the given sizes, wired as segment_anything.build_sam wires it."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    arch = architecture
    embedding_size = arch.image_size // arch.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth, embed_dim=arch.encoder_embed_dim, img_size=arch.image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes, window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim, image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(arch.image_size, arch.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=arch.decoder_depth, embedding_dim=arch.prompt_embed_dim,
                                          mlp_dim=arch.decoder_mlp_dim, num_heads=arch.decoder_num_heads),
            transformer_dim=arch.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=arch.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _fetch_hint(model_type: str) -> str:
    name = CHECKPOINT_NAMES.get(model_type, CHECKPOINT_NAMES["vit_b"])
    return (f"Download {name} from the segment-anything README's model links ({DOWNLOAD_URL}{name}) and put it at "
            f"that path, or set WORKBENCH_SAM_CHECKPOINT to where it is (and WORKBENCH_SAM_MODEL_TYPE to its type: "
            f"vit_b, vit_l or vit_h).")


def check_files(checkpoint_path: str | Path, model_type: str = "vit_b", custom_architecture: bool = False) -> None:
    """Raise ModelNotAvailable (or InvalidInput for an unknown type) before anything is loaded."""
    import importlib.util

    if importlib.util.find_spec("segment_anything") is None:
        raise ModelNotAvailable(f"The SAM backend needs the segment-anything package: `pip install {SAM_PIP}`.")
    if not custom_architecture and model_type not in CHECKPOINT_NAMES:
        raise InvalidInput(f"Unknown SAM model type '{model_type}'; use one of {', '.join(CHECKPOINT_NAMES)}.")
    checkpoint = Path(checkpoint_path).expanduser()
    if not checkpoint.is_file():
        raise_if_missing("SAM segmenter", [Missing(f"SAM {model_type} checkpoint", str(checkpoint),
                                                   _fetch_hint(model_type))])


class SamSegmenter:
    """Per box, SAM's single best mask (multimask_output=False) at the image's full resolution."""

    def __init__(self, checkpoint_path: str | Path, model_type: str = "vit_b", device: str | None = None,
                 architecture: SamArchitecture | None = None):
        check_files(checkpoint_path, model_type, custom_architecture=architecture is not None)
        from segment_anything import SamPredictor, sam_model_registry

        self.checkpoint_path = Path(checkpoint_path).expanduser()
        self.model_type = model_type

        from workbench.config import get_settings
        from workbench.devices import pick_device

        # No checkpoint argument: the builder would torch.load it with full unpickling.
        model = build_sam(architecture) if architecture else sam_model_registry[model_type](checkpoint=None)
        state = load_state_dict(self.checkpoint_path, f"SAM {model_type} checkpoint")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[0][:200]
            raise ModelNotAvailable(
                f"The SAM checkpoint {self.checkpoint_path} does not fit model type '{model_type}' ({first}). "
                f"Set WORKBENCH_SAM_MODEL_TYPE to the type it was released for "
                f"({', '.join(f'{k}: {v}' for k, v in CHECKPOINT_NAMES.items())}).") from None
        self.device = pick_device(device or get_settings().device)
        self.predictor = SamPredictor(model.eval().to(self.device))

    @torch.no_grad()
    def segment(self, image: Image.Image, boxes: list[Box]) -> list[np.ndarray]:
        if not boxes:
            return []
        pixels = np.asarray(image.convert("RGB"))
        self.predictor.set_image(pixels, image_format="RGB")
        box_tensor = torch.tensor([list(box) for box in boxes], dtype=torch.float32, device=self.device)
        transformed = self.predictor.transform.apply_boxes_torch(box_tensor, pixels.shape[:2])
        masks, _, _ = self.predictor.predict_torch(point_coords=None, point_labels=None, boxes=transformed,
                                                   multimask_output=False)
        self.predictor.reset_image()  # the embedding is large (vit_h); keep none between calls
        return [mask[0].cpu().numpy().astype(bool) for mask in masks]

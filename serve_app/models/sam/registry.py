"""Build a SAM model by variant name, with or without a checkpoint.

All variants come out as a model with the same parts (`image_encoder` with `img_size`,
`prompt_encoder`, `mask_decoder`, `preprocess`, `postprocess_masks`), so the predictor,
generator and the reference `segment_anything` code all accept any of them. MobileSAM's
`Sam` is a separate class from segment_anything's, but its prompt encoder and mask decoder
are the same code with the same shapes; only the image encoder (TinyViT) differs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

VARIANTS = ("vit_b", "vit_l", "vit_h", "mobile", "tiny")

# "tiny" keeps segment_anything's own builder and the full-size prompt encoder and decoder
# (img_size 1024, 256x64x64 embedding), so tests exercise every real code path at a
# fraction of the encoder cost. Its masks mean nothing even with a checkpoint: none exists.
TINY_ENCODER = {
    "encoder_embed_dim": 64,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [1],
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_threads(n: int | None) -> None:
    """Intra-op threads for this process (the caller decides; nothing here sets it)."""
    if n is not None and n > 0:
        torch.set_num_threads(n)


def _builders() -> dict[str, Callable[[], nn.Module]]:
    # Imported lazily: mobile_sam pulls in timm, which is slow to import.
    from segment_anything.build_sam import _build_sam, sam_model_registry

    def mobile() -> nn.Module:
        # mobile_sam imports timm through deprecated paths and re-registers TinyViT
        # names: harmless warnings on every start, silenced here only.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", "Overwriting tiny_vit", UserWarning)
            from mobile_sam import sam_model_registry as mobile_registry

        return mobile_registry["vit_t"](checkpoint=None)

    return {
        "vit_b": lambda: sam_model_registry["vit_b"](checkpoint=None),
        "vit_l": lambda: sam_model_registry["vit_l"](checkpoint=None),
        "vit_h": lambda: sam_model_registry["vit_h"](checkpoint=None),
        "mobile": mobile,
        "tiny": lambda: _build_sam(checkpoint=None, **TINY_ENCODER),
    }


def build_sam(variant: str, checkpoint: str | Path | None, device: str = "auto") -> nn.Module:
    """An eval-mode SAM of `variant` on `device`; random weights when `checkpoint` is None.

    The upstream builders load with a bare `torch.load` (pickle, onto the saving device);
    this loads the state dict itself, tensors only, straight onto the target device.
    """
    builders = _builders()
    if variant not in builders:
        raise ValueError(f"unknown SAM variant {variant!r}; expected one of {VARIANTS}")
    dev = resolve_device(device)
    sam = builders[variant]().to(dev)
    if checkpoint is not None:
        state = torch.load(Path(checkpoint), map_location=dev, weights_only=True)
        sam.load_state_dict(state)
    return sam.eval()

"""segment_anything's ImageEncoderViT forward with fused (SDPA) attention.

The stock attention writes the full (heads, N, N) score matrix, adds the decomposed
relative-position terms in a second pass, softmaxes in a third and multiplies in a
fourth; for the global-attention blocks (N = 4096) each pass moves ~0.8 GB for vit_b.
`F.scaled_dot_product_attention` with the relative-position bias as its additive mask
does the scaling, softmax and product in one pass. Same weights and maths; results
differ by float rounding only (~1e-5 absolute on the embedding). On this 2-core AVX2 CPU
the vit_b encoder ran in 15-20 s instead of 23-25 s (best of 4, interleaved).

In bfloat16 (the encoder under autocast, see precision.py) SDPA is the slow choice: on a
2-core AVX512-BF16 CPU (torch 2.14) its CPU flash kernel took 1.1 s per global block with
the bias as mask and 3.9 s without any mask, while the plain product, in-place bias adds,
softmax and product took 0.46 s. bf16 therefore takes the explicit path below.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import Tensor, nn

from serve_app.models.types import stop_if_cancelled


def attention(
    attn: nn.Module, x: Tensor, scratch: dict | None = None, low: dict | None = None
) -> Tensor:
    """segment_anything.modeling.image_encoder.Attention.forward via SDPA."""
    b, h, w, _ = x.shape
    n = attn.num_heads
    qkv = linear(attn.qkv, x, low).reshape(b, h * w, 3, n, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, N, d)
    rel_h = rel_w = None
    if attn.use_rel_pos:
        d = q.shape[-1]
        rh = get_rel_pos(h, h, attn.rel_pos_h)
        rw = get_rel_pos(w, w, attn.rel_pos_w)
        r_q = q.reshape(b * n, h, w, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    if q.dtype == torch.bfloat16:
        out = _attention_explicit(q, k, v, rel_h, rel_w, h, w, scratch)
    else:
        bias = None
        if rel_h is not None:
            bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, n, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(d)
    out = out.view(b, n, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return linear(attn.proj, out, low)


def _attention_explicit(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_h: Tensor | None,
    rel_w: Tensor | None,
    h: int,
    w: int,
    scratch: dict | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(d) + rel_h + rel_w) v with the bias added in place (no
    (N, N) bias tensor), all in q's dtype: autocast is off so the softmax is not
    upcast to a float32 copy of the score matrix.

    The score matrix is written, biased and softmaxed in one buffer, which `scratch`
    keeps across blocks of the same shape: for a global block it is 400 MB (vit_b),
    an allocation the C library maps fresh, page-faulting and zeroing it, every time.
    """
    b, n, length, d = q.shape
    shape = (b, n, length, k.shape[2])
    with torch.autocast(q.device.type, enabled=False):
        key = (shape, q.dtype, q.device)
        buf = scratch.get(key) if scratch is not None else None
        if buf is None:
            buf = torch.empty(shape, dtype=q.dtype, device=q.device)
            if scratch is not None:
                scratch[key] = buf
        s = torch.matmul(q * d**-0.5, k.transpose(-2, -1), out=buf)
        if rel_h is not None:
            grid = s.view(b * n, h, w, h, w)
            grid.add_(rel_h.to(s.dtype)[:, :, :, :, None]).add_(rel_w.to(s.dtype)[:, :, :, None, :])
        s = torch.ops.aten._softmax.out(s, -1, False, out=s)  # in place
        return torch.matmul(s, v)


def block(
    blk: nn.Module,
    x: Tensor,
    scratch: dict | None = None,
    cancel: threading.Event | None = None,
    low: dict | None = None,
) -> Tensor:
    """segment_anything.modeling.image_encoder.Block.forward with `attention` above; a set
    `cancel` stops it between its attention and its MLP. `low`: see `low_weights`."""
    shortcut = x
    x = blk.norm1(x)
    if blk.window_size > 0:
        h, w = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, blk.window_size)
    x = attention(blk.attn, x, scratch, low)
    if blk.window_size > 0:
        x = window_unpartition(x, blk.window_size, pad_hw, (h, w))
    x = shortcut + x
    stop_if_cancelled(cancel, "inside an encoder block")
    mlp = blk.mlp
    return x + linear(mlp.lin2, mlp.act(linear(mlp.lin1, blk.norm2(x), low)), low)


def linear(mod: nn.Linear, x: Tensor, low: dict | None) -> Tensor:
    """`mod(x)`, or with `low` (see `low_weights`) its weights pre-cast: the same numbers
    autocast would compute, without re-casting the weights on every call."""
    if low is None:
        return mod(x)
    w, b = low[mod]
    return F.linear(x.to(w.dtype), w, b)


def low_weights(encoder: nn.Module, dtype: torch.dtype) -> dict:
    """The blocks' Linear weights and biases in `dtype`, cast once and kept on the
    encoder (vit_b: 170 MB in bf16; vit_h 1.2 GB). Under autocast every forward cast
    all of them anew, ~5-8 % of a bf16 vit_b forward on a 2-core CPU. Recast if a weight
    was replaced or changed in place since (checkpoint loaded later)."""
    mods = [m for blk in encoder.blocks for m in (blk.attn.qkv, blk.attn.proj)]
    mods += [m for blk in encoder.blocks for m in (blk.mlp.lin1, blk.mlp.lin2)]
    stamp = (dtype, tuple((m.weight.data_ptr(), m.weight._version) for m in mods))
    cached = getattr(encoder, "_serve_low_weights", None)
    if cached is None or cached[0] != stamp:
        cast = {m: (m.weight.to(dtype), None if m.bias is None else m.bias.to(dtype)) for m in mods}
        cached = (stamp, cast)
        encoder._serve_low_weights = cached  # a plain attribute, not a registered buffer
    return cached[1]


def supports(encoder: nn.Module) -> bool:
    """True for segment_anything's ViT encoder (not MobileSAM's TinyViT)."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    return isinstance(encoder, ImageEncoderViT)


def forward(encoder: nn.Module, x: Tensor, cancel: threading.Event | None = None) -> Tensor:
    """ImageEncoderViT.forward: (1, 3, 1024, 1024) normalised image -> (1, 256, 64, 64).

    A set `cancel` stops it before its next block, or between a block's attention and MLP,
    with `Cancelled`: the encoder is one forward of seconds on a CPU, and a block is a twelfth
    (vit_b) to a thirty-second (vit_h) of it, a global-attention block more.
    """
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    scratch: dict = {}  # attention score buffers, reused across blocks (bf16 only)
    dev = x.device.type
    low = None
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != torch.float32:
        low = low_weights(encoder, torch.get_autocast_dtype(dev))
    for blk in encoder.blocks:
        stop_if_cancelled(cancel, "between encoder blocks")
        x = block(blk, x, scratch, cancel, low)
    return encoder.neck(x.permute(0, 3, 1, 2))

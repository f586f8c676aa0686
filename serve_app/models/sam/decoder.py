"""SAM's mask decoder, re-arranged for many prompts on one image.

Same weights, same maths as `segment_anything.modeling.MaskDecoder`, three changes that
only move floating-point rounding (about 1e-6 relative):

* The image embedding is not repeated per prompt. Until the first image-to-token
  attention writes per-prompt values into it, the image side is shared, so the first
  layer's image projections run once instead of once per prompt.
* Attention projections are folded through the (few) prompt tokens. `q @ k_proj(x).T`
  equals `(q @ W_k) @ x.T + q @ b_k`, and the output projection distributes over the
  softmax average likewise, so the per-prompt work over the 4096 image tokens is two
  256-wide products against 8 heads x ~7 tokens, not four 256x128 projections of 4096
  tokens; most of the time saved is memory traffic of those projections.
* The two transposed convolutions of the upscaler (kernel = stride = 2, so every output
  pixel depends on one input pixel) run as matrix products on channels-last data, with
  `F.layer_norm` in place of the hand-written LayerNorm2d, and only over the embedding
  rows/columns the caller needs (the unpadded part of the image).

Masks are computed only for prompts the caller selects, since the IoU head needs the
transformer's output only: with `pred_iou_thresh` most prompts never need the upscaler.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serve_app.models.types import stop_if_cancelled


def _heads(lin: nn.Linear, num_heads: int) -> tuple[Tensor, Tensor]:
    """Weight as (heads, head_dim, in) and bias as (heads, head_dim)."""
    out_dim, in_dim = lin.weight.shape
    d = out_dim // num_heads
    return lin.weight.view(num_heads, d, in_dim), lin.bias.view(num_heads, d)


def token_to_image(attn: nn.Module, q: Tensor, kx: Tensor, keys: Tensor) -> Tensor:
    """`attn(q=q, k=kx, v=keys)` for prompt tokens q (B, T, C) and image tokens
    kx = keys + key_pe, keys (each 1 or B, N, C)."""
    b, t, _ = q.shape
    n = attn.num_heads
    qp = attn.q_proj(q).view(b, t, n, -1)
    scale = 1.0 / math.sqrt(qp.shape[-1])
    wk, bk = _heads(attn.k_proj, n)
    wv, bv = _heads(attn.v_proj, n)
    c = keys.shape[-1]
    qk = torch.einsum("btnd,ndc->btnc", qp * scale, wk).reshape(b, t * n, c)
    qb = torch.einsum("btnd,nd->btn", qp * scale, bk).reshape(b, t * n, 1)
    if kx.shape[0] == 1:  # shared image side: one product for all prompts
        s = (qk.reshape(b * t * n, c) @ kx[0].T).view(b, t * n, -1)
    else:
        s = torch.bmm(qk, kx.transpose(1, 2))
    s = torch.softmax(s.add_(qb), dim=-1)
    if keys.shape[0] == 1:
        av = (s.view(b * t * n, -1) @ keys[0]).view(b, t, n, c)
    else:
        av = torch.bmm(s, keys).view(b, t, n, c)
    # Softmax rows sum to one, so the value bias passes through the average unchanged.
    out = torch.einsum("btnc,ndc->btnd", av, wv) + bv
    return attn.out_proj(out.reshape(b, t, -1))


def image_to_token(attn: nn.Module, kx: Tensor, keys: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`keys + attn(q=kx, k=k, v=v)` for image tokens kx = keys + key_pe, keys (each 1 or
    B, N, C) and prompt tokens k, v (B, T, C): the residual sum comes out of the output
    product directly."""
    b, t, _ = k.shape
    n = attn.num_heads
    kp = attn.k_proj(k).view(b, t, n, -1)
    vp = attn.v_proj(v).view(b, t, n, -1)
    scale = 1.0 / math.sqrt(kp.shape[-1])
    wq, bq = _heads(attn.q_proj, n)
    c_in = kx.shape[-1]
    c_out = attn.out_proj.weight.shape[0]
    wo = attn.out_proj.weight.view(c_out, n, -1)
    kq = torch.einsum("btnd,ndc->bntc", kp * scale, wq).reshape(b, n * t, c_in)
    kb = torch.einsum("btnd,nd->bnt", kp * scale, bq).reshape(b, n * t, 1)
    # Each head's weights sum to one over the tokens: adding bias/heads to every value
    # row adds the output bias once.
    vo = torch.einsum("btnd,cnd->bntc", vp, wo) + attn.out_proj.bias / n
    vo = vo.reshape(b, n * t, c_out)
    tokens = kx.shape[1]
    # Scores transposed, (B, heads*T, N): the softmax over T is then over a middle axis,
    # which runs vectorised along N (a softmax over a last axis of 7 does not).
    if kx.shape[0] == 1:
        s = (kq.reshape(b * n * t, c_in) @ kx[0].T).view(b, n * t, tokens)
    else:
        s = torch.bmm(kq, kx.transpose(1, 2))
    s = torch.softmax(s.add_(kb).view(b, n, t, tokens), dim=2).view(b, n * t, tokens)
    return torch.baddbmm(keys.expand(b, tokens, c_out), s.transpose(1, 2), vo)


def two_way_transformer(
    tr: nn.Module, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor
) -> tuple[Tensor, Tensor]:
    """`TwoWayTransformer.forward` with a batch-1 image side: (queries, keys)."""
    keys = image_embedding.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries = point_embedding
    query_pe = point_embedding
    for layer in tr.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        kx = keys + key_pe
        attn_out = token_to_image(layer.cross_attn_token_to_image, queries + query_pe, kx, keys)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = image_to_token(
            layer.cross_attn_image_to_token, kx, keys, queries + query_pe, queries
        )
        keys = layer.norm4(keys)
    kx = keys + key_pe
    attn_out = token_to_image(tr.final_attn_token_to_image, queries + query_pe, kx, keys)
    queries = tr.norm_final_attn(queries + attn_out)
    return queries, keys


def _is_exact_gelu(m: nn.Module) -> bool:
    return isinstance(m, nn.GELU) and m.approximate == "none"


class Upscaler:
    """The decoder's `output_upscaling` + hypernetwork product as two matrix products."""

    def __init__(self, md: nn.Module) -> None:
        ct1, ln, act1, ct2, act2 = md.output_upscaling
        if not (_is_exact_gelu(act1) and _is_exact_gelu(act2)):
            raise TypeError("unexpected upscaler activations")
        assert ct1.kernel_size == ct1.stride == (2, 2) and ct2.kernel_size == ct2.stride == (2, 2)
        c_in, self.c1 = ct1.weight.shape[:2]
        self.c2 = ct2.weight.shape[1]
        # Columns ordered (dy, dx, channel) so each sub-pixel's channels are contiguous.
        self.w1 = ct1.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * self.c1)
        self.b1 = ct1.bias.repeat(4)
        self.w2 = ct2.weight.permute(0, 2, 3, 1).reshape(self.c1, 4 * self.c2)
        self.b2 = ct2.bias.repeat(4)
        self.ln = ln

    def __call__(self, keys: Tensor, hyper: Tensor) -> Tensor:
        """keys (B, h, w, C) channels-last, hyper (B, M, C2) -> masks (B, M, 4h, 4w)."""
        b, h, w, c = keys.shape
        m = hyper.shape[1]
        y = torch.addmm(self.b1, keys.reshape(b * h * w, c), self.w1).view(-1, self.c1)
        y = F.gelu(F.layer_norm(y, (self.c1,), self.ln.weight, self.ln.bias, self.ln.eps))
        z = F.gelu(torch.addmm(self.b2, y, self.w2)).view(b, h * w * 16, self.c2)
        out = torch.bmm(z, hyper.transpose(1, 2)).view(b, h, w, 2, 2, 2, 2, m)
        # Output row = 4y + 2dy1 + dy2, column = 4x + 2dx1 + dx2.
        return out.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, m, 4 * h, 4 * w)


@dataclass
class DecoderState:
    """Transformer output for a batch of prompts: enough to get IoUs and, later, masks."""

    tokens: Tensor  # (B, T, C) transformer queries
    keys: Tensor  # (B, HW, C) transformer image side
    grid: tuple[int, int]  # embedding (h, w)


class FastDecoder:
    """Many-prompt mask decoder over one image embedding (see the module docstring)."""

    def __init__(self, sam: nn.Module) -> None:
        self.sam = sam
        self.md = sam.mask_decoder
        self.upscaler = Upscaler(self.md)

    def run(self, image_embedding: Tensor, sparse: Tensor, dense: Tensor) -> DecoderState:
        """Transformer pass. `dense` is the prompt encoder's (1 or B, C, h, w) output; it
        must be the same for every prompt (no mask prompts), which lets the image side stay
        batch 1 through the first attention."""
        md = self.md
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)
        src = image_embedding + dense[:1]
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        hs, keys = two_way_transformer(md.transformer, src, image_pe, tokens)
        return DecoderState(hs, keys, tuple(src.shape[-2:]))

    def iou(self, state: DecoderState, multimask: bool = True) -> Tensor:
        iou = self.md.iou_prediction_head(state.tokens[:, 0, :])
        return iou[:, 1:] if multimask else iou[:, :1]

    def masks(
        self,
        state: DecoderState,
        select: Tensor | None = None,
        rows: int | None = None,
        cols: int | None = None,
        multimask: bool = True,
        chunk: int = 16,
    ) -> Tensor:
        """Low-res logits (B', M, 4*rows, 4*cols) for prompts `select` (index tensor),
        over the top-left `rows` x `cols` cells of the embedding grid."""
        gh, gw = state.grid
        rows, cols = rows or gh, cols or gw
        first = 1 if multimask else 0
        count = self.md.num_mask_tokens - 1 if multimask else 1
        tokens, keys = state.tokens, state.keys
        if select is not None and len(select) < len(keys):  # all selected: no copy
            tokens, keys = tokens[select], keys[select]
        mask_tokens = tokens[:, 1 + first : 1 + first + count, :]
        hyper = torch.stack(
            [
                self.md.output_hypernetworks_mlps[first + i](mask_tokens[:, i, :])
                for i in range(count)
            ],
            dim=1,
        )
        grid = keys.view(keys.shape[0], gh, gw, -1)[:, :rows, :cols]
        # Sub-batches keep the upscaler's intermediates (about 4x the output) cache-sized.
        outs = [
            self.upscaler(grid[i : i + chunk], hyper[i : i + chunk])
            for i in range(0, grid.shape[0], chunk)
        ]
        if not outs:
            return keys.new_zeros((0, count, 4 * rows, 4 * cols))
        return torch.cat(outs)

    def predict(
        self,
        image_embedding: Tensor,
        sparse: Tensor,
        dense: Tensor,
        grid_hw: tuple[int, int],
        iou_thresh: float | None = None,
        multimask: bool = True,
        batch: int = 4,
        cancel: threading.Event | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """IoU predictions (B, M) for all prompts, the indices of the prompts with some IoU
        above `iou_thresh` (all if None), and their low-res logits (B', M, 4*gh, 4*gw).

        Prompts go `batch` at a time: each carries ~4 MiB of image-side activations per
        tensor, and a small batch keeps them in cache from the transformer through the
        upscaler (on a 2-core CPU, 4 prompts ran ~3x faster per prompt than 64). A set
        `cancel` stops it before the next `batch` (`Cancelled`).
        """
        ious, selects, lows = [], [], []
        for i in range(0, sparse.shape[0], batch):
            stop_if_cancelled(cancel, "between decoder batches")
            d = dense[i : i + batch] if dense.shape[0] > 1 else dense
            state = self.run(image_embedding, sparse[i : i + batch], d)
            iou = self.iou(state, multimask)
            if iou_thresh is None:
                select = torch.arange(iou.shape[0])
            else:
                select = torch.nonzero((iou > iou_thresh).any(1)).flatten()
            if len(select):
                lows.append(self.masks(state, select, *grid_hw, multimask, chunk=batch))
            ious.append(iou)
            selects.append(select + i)
        count = ious[0].shape[1] if ious else 1
        low = (
            torch.cat(lows)
            if lows
            else sparse.new_zeros((0, count, 4 * grid_hw[0], 4 * grid_hw[1]))
        )
        return torch.cat(ious), torch.cat(selects), low

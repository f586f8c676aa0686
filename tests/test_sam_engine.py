"""SAM engine (no Ray, no HTTP): registry, automatic masks, prompted masks, RLE, overlay.

Everything runs the real code paths on the "tiny" variant with random weights (no SAM
checkpoint reaches CI): the masks mean nothing, so the checks are about agreement with
segment_anything's own generator/predictor on the same weights, and about bookkeeping.
"""

from __future__ import annotations

import json
import time
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGES
from segment_anything.utils.amg import batched_mask_to_box

from serve_app.models.sam import resample
from serve_app.models.sam.amg import FastMaskGenerator
from serve_app.models.sam.prompt import EmbeddingCache, PromptedSegmenter
from serve_app.models.sam.registry import build_sam
from serve_app.rendering import rle
from serve_app.rendering.masks import overlay

# Random weights give logits within about +-0.5, so the default stability offset (1.0)
# scores every mask 0. A small offset gives the stability filter something to decide.
OFFSET = 0.05


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_sam("tiny", None, device="cpu")


def _image(w: int, h: int) -> np.ndarray:
    import cv2

    path = IMAGES / "truck.jpg"
    if path.exists():
        bgr = cv2.imread(str(path))
        return cv2.cvtColor(
            cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
        )
    rng = np.random.default_rng(0)  # shared data absent: any image does for random weights
    return cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (0, 0), 8)


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    return _image(320, 240)


@pytest.fixture(scope="module")
def large() -> np.ndarray:
    # Long side > 1024: the path that filters at model scale and decodes at full size.
    return _image(1100, 825)


UNFILTERED = dict(
    points_per_side=3,
    pred_iou_thresh=0,
    stability_score_thresh=0,
    stability_score_offset=OFFSET,
    box_nms_thresh=1.0,
)


@pytest.fixture(scope="module")
def unfiltered(sam, small, large) -> dict:
    """(reference records, our records) per image with every filter off."""
    return {
        name: (
            _reference(sam, image, **UNFILTERED),
            FastMaskGenerator(sam, **UNFILTERED).generate(image),
        )
        for name, image in (("small", small), ("large", large))
    }


def _reference(sam, image, **kw) -> list[dict]:
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **kw).generate(image)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _assert_same_output(ref: list[dict], mine, min_iou: float = 0.9) -> None:
    """Same masks, in the same order, with the same reported numbers."""
    assert len(mine) == len(ref)
    for r, m in zip(ref, mine, strict=True):
        assert _iou(rle.decode(r["segmentation"]), m.mask()) >= min_iou
        assert m.point_coords == r["point_coords"]
        assert m.predicted_iou == pytest.approx(r["predicted_iou"], abs=1e-5)
        assert m.stability_score == pytest.approx(r["stability_score"], abs=1e-3)
        assert np.allclose(m.bbox, r["bbox"], atol=1)
        assert abs(m.area - r["area"]) <= max(2, 1e-4 * r["area"])


# -- registry -----------------------------------------------------------------------------
def test_registry_builds_tiny_and_loads_checkpoint(sam, tmp_path):
    assert sam.image_encoder.img_size == 1024
    assert not sam.training
    ckpt = tmp_path / "tiny.pth"
    torch.save(sam.state_dict(), ckpt)
    again = build_sam("tiny", ckpt, device="auto")
    for (name, a), b in zip(sam.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b.cpu()), name
    with pytest.raises(ValueError, match="unknown SAM variant"):
        build_sam("vit_x", None)


def test_fused_attention_encoder_matches_stock(sam, small):
    from serve_app.models.sam.encoder import embed

    stock, fused = embed(sam, small, fused=False), embed(sam, small, fused=True)
    assert stock.input_hw == fused.input_hw == (768, 1024)
    assert torch.allclose(stock.features, fused.features, atol=1e-4)


# -- RLE ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (240, 320)])
def test_rle_round_trip(shape):
    rng = np.random.default_rng(1)
    for mask in (
        np.zeros(shape, bool),
        np.ones(shape, bool),
        rng.random(shape) > 0.5,
        np.asfortranarray(rng.random(shape) > 0.9),
    ):
        code = rle.encode(mask)
        json.dumps(code)  # counts is a str
        assert code["size"] == list(shape)
        assert np.array_equal(rle.decode(code), mask)
        assert rle.area(code) == mask.sum()
    uncompressed = {"size": [2, 3], "counts": [1, 2, 3]}  # segment_anything's format
    assert rle.decode(uncompressed).T.flatten().tolist() == [0, 1, 1, 0, 0, 0]


# -- resampling ---------------------------------------------------------------------------
@pytest.mark.parametrize("orig", [(240, 320), (816, 1224), (1500, 1001)])
def test_full_res_decode_is_bit_identical_to_reference_resize(orig):
    torch.manual_seed(2)
    low = torch.randn(1, 1, 256, 256)
    g = resample.geometry(orig)
    up = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
    ref = up[..., : g.input_hw[0], : g.input_hw[1]]
    ref = F.interpolate(ref, orig, mode="bilinear", align_corners=False)[0, 0]
    dec = resample.FullResDecoder(g, strip_floats=50_000)  # several column strips
    d = dec.decode(low[0, 0, : g.low_hw[0], : g.low_hw[1]], 0.0, 1.0)
    assert np.array_equal(d.mask, (ref > 0).numpy())
    _, area, box = d.summary()
    assert area == int((ref > 0).sum())
    assert box == tuple(batched_mask_to_box(ref > 0).tolist())
    expected = (ref > 1).sum() / (ref > -1).sum()
    assert d.stability == pytest.approx(float(expected), abs=1e-7)


def test_band_boxes_match_full_decode():
    g = resample.geometry((2000, 1500))
    torch.manual_seed(3)
    lh, lw = g.low_hw
    yy, xx = torch.meshgrid(torch.arange(lh), torch.arange(lw), indexing="ij")
    lows = []
    for _ in range(12):  # blobs of random size and place, some touching the border
        cy, cx = torch.rand(2) * torch.tensor([lh, lw])
        r = 1 + torch.rand(1) * 40
        lows.append(1.0 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
    lows.append(torch.full((lh, lw), -1.0))  # empty
    low = torch.stack(lows)
    boxes = resample.BandBoxes(g)(resample.to_input_scale(low, g))
    dec = resample.FullResDecoder(g)
    for i in range(len(low)):
        assert tuple(boxes[i].tolist()) == dec.decode(low[i]).summary()[2]


# -- automatic masks ----------------------------------------------------------------------
def test_records_are_consistent_with_their_rle(unfiltered, small):
    masks = unfiltered["small"][1]
    assert len(masks) == 3 * 3 * 3
    h, w = small.shape[:2]
    for m in masks:
        mask = m.mask()
        assert mask.shape == (h, w) and m.rle["size"] == [h, w]
        assert m.area == mask.sum()
        assert m.bbox == _bbox_of(mask)
        ((x, y),) = m.point_coords
        assert 0 <= x < w and 0 <= y < h
        json.dumps(m.as_dict())


def _bbox_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    if not mask.any():
        return (0, 0, 0, 0)
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min())


@pytest.mark.parametrize("which", ["small", "large"])
def test_fidelity_vs_reference_without_filters(unfiltered, which):
    ref, mine = unfiltered[which]
    _assert_same_output(ref, mine, min_iou=0.999)


def test_thresholds_and_nms_honoured_like_reference(sam, large, unfiltered):
    # The large image: where filters run at model scale (stability re-checked at full
    # size near the threshold) and NMS uses boxes found from a few full-size rows.
    probe = unfiltered["large"][1]
    iou_thr = float(np.quantile([m.predicted_iou for m in probe], 0.3))
    stab_thr = float(np.quantile([m.stability_score for m in probe], 0.3))
    kw = dict(
        points_per_side=3,
        pred_iou_thresh=iou_thr,
        stability_score_thresh=stab_thr,
        stability_score_offset=OFFSET,
        box_nms_thresh=0.7,
    )
    mine = FastMaskGenerator(sam, **kw).generate(large)
    assert 0 < len(mine) < len(probe)
    assert all(m.predicted_iou > iou_thr and m.stability_score >= stab_thr for m in mine)
    assert [m.predicted_iou for m in mine] == sorted((m.predicted_iou for m in mine), reverse=True)
    from torchvision.ops import box_iou

    xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (m.bbox for m in mine)]).float()
    overlap = box_iou(xyxy, xyxy).fill_diagonal_(0)
    assert overlap.max() <= 0.7 + 1e-6
    _assert_same_output(_reference(sam, large, **kw), mine)


def test_small_region_removal_like_reference(sam, small):
    kw = dict(
        points_per_side=2,
        pred_iou_thresh=0,
        stability_score_thresh=0,
        box_nms_thresh=1.0,  # keep all 12: the second NMS then only orders them
        min_mask_region_area=500,
    )
    _assert_same_output(_reference(sam, small, **kw), FastMaskGenerator(sam, **kw).generate(small))


def test_progress_goes_from_0_to_1(sam, small):
    seen: list[tuple[float, str]] = []
    FastMaskGenerator(sam, points_per_side=2, points_per_batch=2).generate(
        small, progress=lambda f, s: seen.append((f, s))
    )
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    stages = [s for _, s in seen]
    assert stages[0] == "encoder" and stages[-1] == "postprocess"
    assert "decoder batch 2/2" in stages


def test_unsupported_options(sam):
    with pytest.raises(ValueError, match="point grids"):
        FastMaskGenerator(
            sam, points_per_side=None, point_grids=[np.zeros((1, 2))], crop_n_layers=1
        )
    with pytest.raises(ValueError):
        FastMaskGenerator(sam, crop_n_layers=-1)
    with pytest.raises(ValueError):
        FastMaskGenerator(sam, points_per_side=None)
    with pytest.raises(ValueError):
        FastMaskGenerator(sam).generate(np.zeros((10, 10), np.uint8))


# -- prompted masks -----------------------------------------------------------------------
def test_prompted_points_and_boxes_match_predictor(sam, small):
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    predictor.set_image(small)
    seg = PromptedSegmenter(sam, cache_bytes=64 * 2**20)
    points, labels = [(100, 80), (200, 150)], [1, 0]
    boxes = [(20, 30, 150, 200), (160, 40, 300, 230)]

    got = seg.segment(small, "img", points=points, labels=labels, multimask=True)
    want, scores, _ = predictor.predict(
        np.array(points, float), np.array(labels), multimask_output=True
    )
    assert len(got) == 3
    for g, w, s in zip(got, want, scores, strict=True):
        assert np.array_equal(g.mask(), w)
        assert g.predicted_iou == pytest.approx(float(s), abs=1e-6)
        assert g.bbox == _bbox_of(w)

    got = seg.segment(small, "img", boxes=boxes)
    assert len(got) == 2
    for g, box in zip(got, boxes, strict=True):
        want, _, _ = predictor.predict(box=np.array(box, float), multimask_output=False)
        assert np.array_equal(g.mask(), want[0])
        assert g.box_prompt == list(map(float, box))

    got = seg.segment(small, "img", points=points[:1], labels=[1], boxes=boxes[:1])
    want, _, _ = predictor.predict(
        np.array(points[:1], float),
        np.array([1]),
        box=np.array(boxes[0], float),
        multimask_output=False,
    )
    assert len(got) == 1 and np.array_equal(got[0].mask(), want[0])
    with pytest.raises(ValueError):
        seg.segment(small, "img")


def test_embedding_cache_skips_encoder_and_evicts_by_bytes(sam, small):
    one = 256 * 64 * 64 * 4  # float32 embedding
    seg = PromptedSegmenter(sam, cache_bytes=int(1.5 * one))
    seg.segment(small, "a", points=[(10, 10)])
    assert seg.encoder_calls == 1 and not seg.last_hit
    seg.segment(small, "a", points=[(50, 60)])
    assert seg.encoder_calls == 1 and seg.last_hit
    seg.segment(small[::-1].copy(), "b", points=[(10, 10)])  # evicts "a"
    assert seg.encoder_calls == 2 and len(seg.cache) == 1 and "b" in seg.cache
    assert seg.cache.nbytes <= seg.cache.max_bytes
    assert "a" not in seg.cache


def test_embedding_cache_lru_order():
    class Item:
        nbytes = 10

    cache = EmbeddingCache(25)
    cache.put("a", Item())
    cache.put("b", Item())
    assert cache.get("a") is not None  # "a" now most recent
    cache.put("c", Item())
    assert "a" in cache and "c" in cache and "b" not in cache
    off = EmbeddingCache(0)
    off.put("a", Item())
    assert len(off) == 0 and off.nbytes == 0


# -- overlay ------------------------------------------------------------------------------
def test_overlay_draws_largest_first_with_flat_inputs(small):
    h, w = small.shape[:2]
    big = np.zeros((h, w), bool)
    big[20:200, 20:300] = True
    tiny = np.zeros((h, w), bool)
    tiny[50:60, 50:60] = True
    from serve_app.models.sam.records import MaskRecord

    def rec(m):
        return MaskRecord(rle.encode(m), _bbox_of(m), int(m.sum()), 1.0, 1.0)

    image = np.full((h, w, 3), 128, np.uint8)
    out = overlay(image, [rec(tiny), rec(big)], alpha=0.35, seed=7)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[~big], image[~big])  # untouched outside the masks
    assert (out[big] != 128).any(axis=-1).all()
    # The small mask is drawn last (on top), so its pixels got a second blend.
    assert not np.array_equal(out[55, 55], out[100, 100])
    assert np.array_equal(out, overlay(image, [rec(big), rec(tiny)], seed=7))


# -- MobileSAM ----------------------------------------------------------------------------
@pytest.mark.slow
def test_mobile_variant_runs_and_matches_predictor(small):
    from segment_anything import SamPredictor

    torch.manual_seed(0)
    t0 = time.perf_counter()
    mobile = build_sam("mobile", None, device="cpu")
    got = PromptedSegmenter(mobile).segment(small, None, points=[(100, 100)], multimask=True)
    predictor = SamPredictor(mobile)  # segment_anything's predictor takes MobileSAM as is
    predictor.set_image(small)
    want, _, _ = predictor.predict(np.array([[100.0, 100.0]]), np.array([1]))
    assert [np.array_equal(g.mask(), w) for g, w in zip(got, want, strict=True)] == [True] * 3
    auto = FastMaskGenerator(
        mobile, points_per_side=2, pred_iou_thresh=0, stability_score_thresh=0
    ).generate(small)
    assert len(auto) > 0
    assert time.perf_counter() - t0 < 300


# -- crop layers --------------------------------------------------------------------------
CROPPED = dict(UNFILTERED, crop_n_layers=1, crop_nms_thresh=1.0)


def _never_near_edge(boxes, crop_box, orig_box, atol=20.0):
    return torch.zeros(len(boxes), dtype=torch.bool)


def _no_crop_edge_filter(mp: pytest.MonkeyPatch) -> None:
    mp.setattr("segment_anything.automatic_mask_generator.is_box_near_crop_edge", _never_near_edge)
    mp.setattr("serve_app.models.sam.amg.is_box_near_crop_edge", _never_near_edge)


@pytest.fixture(scope="module")
def cropped(sam, small, large) -> dict:
    """(reference records, ours) with one crop layer and every filter off, including the
    crop-edge filter, which the reference cannot switch off: random weights make every
    mask a large blob touching its crop's edges, so with it no crop mask would survive
    (test_crop_layers_with_nms_... keeps it on)."""
    with pytest.MonkeyPatch.context() as mp:
        _no_crop_edge_filter(mp)
        return {
            name: (
                _reference(sam, image, **CROPPED),
                FastMaskGenerator(sam, **CROPPED).generate(image),
            )
            for name, image in (("small", small), ("large", large))
        }


@pytest.mark.parametrize("which", ["small", "large"])
def test_crop_layers_match_reference_without_filters(cropped, which):
    # Same crops, same points per crop, same crop-edge filter, same order (smaller crops
    # first); the large image's full layer takes the model-scale path, its crops do not.
    ref, mine = cropped[which]
    assert len({tuple(r["crop_box"]) for r in ref}) == 5  # the image and 4 crops
    _assert_same_output(ref, mine, min_iou=0.99)
    assert [list(m.as_dict()["crop_box"]) for m in mine] == [r["crop_box"] for r in ref]


def test_crop_edge_filter_like_reference(sam, large):
    kw = dict(CROPPED, points_per_side=2)
    mine = FastMaskGenerator(sam, **kw).generate(large)
    _assert_same_output(_reference(sam, large, **kw), mine, min_iou=0.99)
    assert len(mine) < 5 * 2 * 2 * 3  # the filter dropped crop masks touching crop edges


def test_crop_layers_with_nms_and_downscaled_grids_like_reference(sam, small, monkeypatch):
    from segment_anything.utils.amg import build_all_layer_point_grids

    _no_crop_edge_filter(monkeypatch)

    kw = dict(
        points_per_side=4,
        pred_iou_thresh=0,
        stability_score_thresh=0,
        stability_score_offset=OFFSET,
        box_nms_thresh=0.7,
        crop_n_layers=1,
        crop_nms_thresh=0.5,
        crop_n_points_downscale_factor=2,
        crop_overlap_ratio=0.25,
    )
    gen = FastMaskGenerator(sam, **kw)
    want = build_all_layer_point_grids(4, 1, 2)
    assert [len(g) for g in gen.point_grids] == [16, 4]
    assert all(np.array_equal(a, b) for a, b in zip(gen.point_grids, want, strict=True))
    mine = gen.generate(small)
    ref = _reference(sam, small, **kw)
    _assert_same_output(ref, mine, min_iou=0.99)
    assert len({m.crop_box for m in mine}) > 1
    assert len(mine) < (16 + 4 * 4) * 3  # the NMS passes removed some


# -- precision ----------------------------------------------------------------------------
CPU = torch.device("cpu")


def test_auto_dtype_follows_native_bf16_flags():
    from serve_app.models.sam.precision import choose

    x86_old = {"sse4_2", "avx2", "fma", "avx512f"}
    assert choose("auto", CPU, flags=x86_old, machine="x86_64").dtype == torch.float32
    for flag in ("avx512_bf16", "amx_bf16"):
        d = choose("auto", CPU, flags=x86_old | {flag}, machine="x86_64")
        assert d.dtype == torch.bfloat16 and flag in d.reason and d.name == "bfloat16"
    assert choose("auto", CPU, flags={"asimd", "bf16"}, machine="aarch64").dtype == torch.bfloat16
    assert choose("auto", CPU, flags={"asimd"}, machine="aarch64").dtype == torch.float32
    # An Arm flag on x86 (or the other way round) means nothing.
    assert choose("auto", CPU, flags={"bf16"}, machine="x86_64").dtype == torch.float32


def test_auto_dtype_probe_can_veto_and_explicit_dtypes_are_honoured():
    from serve_app.models.sam.precision import choose

    native = {"avx512_bf16"}
    slow = choose("auto", CPU, flags=native, machine="x86_64", probe=lambda d: 0.9)
    assert slow.dtype == torch.float32 and "probe 0.90x" in slow.reason
    fast = choose("auto", CPU, flags=native, machine="x86_64", probe=lambda d: 2.5)
    assert fast.dtype == torch.bfloat16 and "probe 2.50x" in fast.reason
    never = choose("auto", CPU, flags=set(), machine="x86_64", probe=lambda d: 1 / 0)
    assert never.dtype == torch.float32  # no flags: the probe is not even run
    assert choose("float32", CPU, flags=native).dtype == torch.float32
    assert choose("bfloat16", CPU, flags=set()).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        choose("float16", CPU)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    from serve_app.models.sam.precision import cpu_flags

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert {"avx2", "avx512_bf16"} <= cpu_flags(str(x86))
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert "bf16" in cpu_flags(str(arm))


def test_explicit_bf16_attention_is_the_same_maths_as_sdpa():
    from segment_anything.modeling.image_encoder import get_rel_pos

    from serve_app.models.sam.vit import _attention_explicit

    torch.manual_seed(4)
    b, n, h, w, d = 2, 3, 5, 7, 8
    q, k, v = (torch.randn(b, n, h * w, d) for _ in range(3))
    rh = get_rel_pos(h, h, torch.randn(2 * h - 1, d))
    rw = get_rel_pos(w, w, torch.randn(2 * w - 1, d))
    r_q = q.reshape(b * n, h, w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    bias = (rel_h[..., None] + rel_w[..., None, :]).reshape(b, n, h * w, h * w)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    got = _attention_explicit(q, k, v, rel_h, rel_w, h, w)  # float32 in: exact maths
    assert torch.allclose(got, want, atol=1e-5)


def test_bf16_encoder_gives_a_close_float32_embedding(sam, small):
    from serve_app.models.sam.encoder import embed

    a = embed(sam, small).features
    b = embed(sam, small, dtype=torch.bfloat16).features
    assert b.dtype == torch.float32 and b.shape == a.shape
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.03  # bf16 did run (not bit-identical) and stayed close
    seg = PromptedSegmenter(sam, dtype=torch.bfloat16)
    got = seg.segment(small, "k", points=[(100, 80)], multimask=True)
    assert len(got) == 3 and seg.cache.get("k").features.dtype == torch.float32


def test_bf16_automatic_masks_run_with_crops(sam, small):
    kw = dict(UNFILTERED, crop_n_layers=1, crop_nms_thresh=0.9)
    b16 = FastMaskGenerator(sam, dtype=torch.bfloat16, **kw).generate(small)
    from serve_app.models.sam.compare import iou_stats, matched_ious

    f32 = FastMaskGenerator(sam, **kw).generate(small)
    stats = iou_stats(matched_ious(f32, b16))
    assert stats["masks"] == len(f32) > 0 and stats["iou_mean"] > 0.5


def test_precast_bf16_linears_match_autocast_and_follow_weight_changes(sam, small):
    from serve_app.models.sam import vit
    from serve_app.models.sam.encoder import embed

    enc = sam.image_encoder
    got = embed(sam, small, dtype=torch.bfloat16).features
    cached = enc._serve_low_weights
    assert all(w.dtype == torch.bfloat16 for w, _ in cached[1].values())
    with mock.patch.object(vit, "low_weights", lambda e, d: None):  # plain autocast
        want = embed(sam, small, dtype=torch.bfloat16).features
    assert torch.equal(got, want)
    qkv = enc.blocks[0].attn.qkv
    saved = qkv.weight.detach().clone()
    try:
        with torch.no_grad():
            qkv.weight.mul_(2)  # e.g. a checkpoint loaded after the first bf16 call
        vit.low_weights(enc, torch.bfloat16)
        assert enc._serve_low_weights is not cached
        assert torch.equal(enc._serve_low_weights[1][qkv][0], qkv.weight.to(torch.bfloat16))
    finally:
        with torch.no_grad():
            qkv.weight.copy_(saved)

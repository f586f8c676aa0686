"""SAM engine (no Ray, no HTTP): registry, automatic masks, prompted masks, RLE, overlay.

Everything runs the real code paths on the "tiny" variant with random weights (no SAM
checkpoint reaches CI): the masks mean nothing, so the checks are about agreement with
segment_anything's own generator/predictor on the same weights, and about bookkeeping.
"""

from __future__ import annotations

import json
import time

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
    with pytest.raises(NotImplementedError):
        FastMaskGenerator(sam, crop_n_layers=1)
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

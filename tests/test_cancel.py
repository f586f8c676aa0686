"""Cancelling YuNet and SAM work, and SAM's work budget, in process (no Ray).

A model runs in a worker thread that cannot be killed; the deployment sets a cancel event
when Serve cancels the call (the router's timeout) and the model stops at its next check.
The model-level tests are exact: the event is set at a known step and the test counts the
steps that ran after it (none). The deployment-level tests cancel real calls in the middle
of real work and time how long the model takes to let go.
"""

from __future__ import annotations

import asyncio
import threading
import time

import cv2
import numpy as np
import pytest
import torch
from helpers import shared_file

from serve_app.errors import ServiceError
from serve_app.models.types import Cancelled
from serve_app.registry import MODELS

YUNET, LIGHT = "yunet-face-detection", "sam-segmentation-light"


def deployment(name: str, model_dir, options: dict | None = None):
    cls = MODELS[name].deployment_class().func_or_class
    return cls(name, options or {}, str(model_dir) if model_dir else None, 50_000_000)


def big_jpeg(width: int, height: int) -> bytes:
    img = cv2.imread(str(shared_file("images", "truck.jpg")))
    ok, buf = cv2.imencode(".jpg", cv2.resize(img, (width, height)))
    assert ok
    return buf.tobytes()


class Watch:
    """Counts calls of a method and can set a cancel event at the n-th: the exact step."""

    def __init__(self, monkeypatch, owner, name: str, cancel_at: int | None = None) -> None:
        self.calls = 0
        self.cancel = threading.Event()
        self.reached = threading.Event()  # the n-th call has started
        self.cancel_at = cancel_at
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls == self.cancel_at:
                self.cancel.set()
                self.reached.set()
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


# -- YuNet --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yunet(model_dir):
    shared_file("yunet", "yunet_n_640_640.onnx")
    return deployment(YUNET, model_dir)


def yunet_passes(w: int, h: int):
    from serve_app.models.yunet import PlanSettings, plan

    return plan(w, h, small_faces=True, settings=PlanSettings(max_side=2000))


def test_yunet_stops_at_the_next_forward(yunet, monkeypatch) -> None:
    model = yunet.ready_model()
    image = cv2.imdecode(np.frombuffer(big_jpeg(3000, 2000), np.uint8), cv2.IMREAD_COLOR)
    passes = yunet_passes(3000, 2000)
    whole = Watch(monkeypatch, model, "forward")
    model.detect(image, passes)
    assert whole.calls >= 6, "the plan must have several forwards for this test to mean much"
    monkeypatch.undo()
    # The first tile; the tiled pass's last tile (then the next pass); the next-to-last pass.
    for at in (1, whole.calls - 2, whole.calls - 1):
        w = Watch(monkeypatch, model, "forward", cancel_at=at)
        with pytest.raises(Cancelled):
            model.detect(image, passes, cancel=w.cancel)
        assert w.calls == at, f"{w.calls - at} forward(s) ran after the cancel"
        monkeypatch.undo()


def test_a_cancelled_yunet_request_frees_the_model(yunet, monkeypatch) -> None:
    """Cancelled (as Serve does on the router's timeout) once its first forward runs, the
    call lets go of the model before most of its forwards."""
    model = yunet.ready_model()
    data = big_jpeg(3000, 2000)
    params = {"small_faces": True, "max_side": 2000}
    started = Watch(monkeypatch, model, "forward", cancel_at=1)
    started.cancel = threading.Event()  # the deployment's own event does the cancelling

    async def main() -> float:
        task = asyncio.ensure_future(yunet.detect(data, params))
        assert await asyncio.to_thread(started.reached.wait, 60)
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(yunet._model_lock.acquire, True, 60)
        freed = time.monotonic() - t0
        yunet._model_lock.release()
        return freed

    freed = asyncio.run(main())
    planned = yunet_passes(3000, 2000)
    print(
        f"\nyunet: cancelled at forward 1; model free {freed * 1e3:.0f} ms later, "
        f"after {started.calls} forward(s)"
    )
    assert len(planned) == 3 and started.calls <= 2  # the one running, at most one more
    assert freed < 1.0


# -- SAM ----------------------------------------------------------------------------------
SAM_OPTIONS = {"variant": "tiny", "random_weights": True, "dtype": "float32"}
UNFILTERED = {"pred_iou_thresh": 0, "stability_score_thresh": 0, "box_nms_thresh": 1.0}


@pytest.fixture(scope="module")
def sam_dep():
    torch.manual_seed(0)
    return deployment(LIGHT, None, SAM_OPTIONS)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    img = cv2.imread(str(shared_file("images", "truck.jpg")))
    return cv2.cvtColor(cv2.resize(img, (640, 480)), cv2.COLOR_BGR2RGB)


def test_sam_encoder_stops_between_blocks(sam_dep, rgb, monkeypatch) -> None:
    from serve_app.models.sam import vit
    from serve_app.models.sam.encoder import embed

    model = sam_dep.ready_model()
    blocks = len(model.image_encoder.blocks)
    for at in range(1, blocks):  # set during the last block, nothing is left to stop
        w = Watch(monkeypatch, vit, "block", cancel_at=at)
        with pytest.raises(Cancelled):
            embed(model, rgb, cancel=w.cancel)
        assert w.calls == at, f"{w.calls - at} block(s) ran after the cancel"
        monkeypatch.undo()
    assert embed(model, rgb, cancel=threading.Event()).features.shape == (1, 256, 64, 64)


def test_sam_automatic_masks_stop_between_decoder_batches_and_crops(
    sam_dep, rgb, monkeypatch
) -> None:
    from serve_app.models.sam import vit
    from serve_app.models.sam.amg import FastMaskGenerator
    from serve_app.models.sam.decoder import FastDecoder

    model = sam_dep.ready_model()
    gen = FastMaskGenerator(model, points_per_side=6, crop_n_layers=1, **UNFILTERED)
    whole = Watch(monkeypatch, FastDecoder, "run")
    assert gen.generate(rgb)
    assert whole.calls >= 5 * 9  # 5 crops of 36 prompts, 4 at a time
    monkeypatch.undo()
    for at in (1, 10, 11, whole.calls - 1):  # the first crop, later crops, the last batch
        w = Watch(monkeypatch, FastDecoder, "run", cancel_at=at)
        with pytest.raises(Cancelled):
            gen.generate(rgb, cancel=w.cancel)
        assert w.calls == at, f"{w.calls - at} decoder batch(es) ran after the cancel"
        monkeypatch.undo()
    # Set during the last crop's encoder: no decoder batch of that crop runs.
    blocks = len(model.image_encoder.blocks)
    w = Watch(monkeypatch, vit, "block", cancel_at=4 * blocks + 1)
    runs = Watch(monkeypatch, FastDecoder, "run")
    with pytest.raises(Cancelled):
        gen.generate(rgb, cancel=w.cancel)
    assert w.calls == 4 * blocks + 1 and runs.calls == 4 * 9


def test_sam_prompted_stops_before_the_encoder_finishes(sam_dep, rgb, monkeypatch) -> None:
    from serve_app.models.sam import vit

    w = Watch(monkeypatch, vit, "block", cancel_at=1)
    with pytest.raises(Cancelled):
        sam_dep.prompted.segment(rgb, None, points=[[10, 10]], cancel=w.cancel)
    assert w.calls == 1


def test_a_cancelled_sam_request_frees_the_replica(sam_dep, monkeypatch) -> None:
    """Cancelled at its first decoder batch, the automatic call's thread ends within a
    second, long before its 64 decoder batches and 768 full-size masks would have."""
    from serve_app.models.sam.decoder import FastDecoder

    data = big_jpeg(2400, 1800)
    started = Watch(monkeypatch, FastDecoder, "run", cancel_at=1)

    async def main() -> float:
        task = asyncio.ensure_future(sam_dep.generate(data, {"points_per_side": 16, **UNFILTERED}))
        assert await asyncio.to_thread(started.reached.wait, 120)
        assert sam_dep._running == 1
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        while sam_dep._running and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.005)
        return time.monotonic() - t0

    freed = asyncio.run(main())
    print(
        f"\nsam: cancelled at decoder batch 1; thread done {freed * 1e3:.0f} ms later, "
        f"after {started.calls} of 64 decoder batches"
    )
    assert sam_dep._running == 0
    assert started.calls < 64
    assert freed < 1.0


# -- SAM's work budget --------------------------------------------------------------------
def refusal(dep, params: dict) -> ServiceError:
    with pytest.raises(ServiceError) as exc:
        asyncio.run(dep.generate(b"not even an image", params))
    return exc.value


def test_sam_budget_admits_the_documented_settings_and_names_the_parameter(sam_dep) -> None:
    from serve_app.models.sam.work import planned_work

    dep = deployment(LIGHT, None, {**SAM_OPTIONS, "points_per_side": 32})
    budget = dep.options.max_decoder_prompts
    for pps, crops in ((32, 0), (32, 1), (64, 0)):  # default, one crop layer, the max side
        assert planned_work(pps, crops).decoder_prompts <= budget
        # within budget the call goes on to decoding (which fails on these bytes)
        err = refusal(dep, {"points_per_side": pps, "crop_n_layers": crops})
        assert err.code != "over_work_budget", err.message
    err = refusal(dep, {"points_per_side": 64, "crop_n_layers": 1})
    print(f"\n{err.message}")
    assert (err.status, err.code) == (422, "over_work_budget")
    # The crop layer's default alone (4,096) saves more than points_per_side's (5,120).
    assert "crop_n_layers=1" in err.message and "20,480 decoder prompts" in err.message
    assert "options.max_decoder_prompts" in err.message


def test_sam_absurd_points_are_refused_even_when_the_range_allows_them() -> None:
    dep = deployment(LIGHT, None, {**SAM_OPTIONS, "max_points_per_side": 1000})
    err = refusal(dep, {"points_per_side": 1000})
    assert err.code == "over_work_budget" and "points_per_side=1000" in err.message
    # Under the shipped range it is already out of bounds.
    assert refusal(deployment(LIGHT, None, SAM_OPTIONS), {"points_per_side": 1000}).code == (
        "bad_parameter"
    )


def test_sam_crop_layer_without_points_is_a_422_not_a_crash() -> None:
    dep = deployment(LIGHT, None, {**SAM_OPTIONS, "crop_n_points_downscale_factor": 4})
    err = refusal(dep, {"points_per_side": 3, "crop_n_layers": 1})
    assert (err.status, err.code) == (422, "bad_parameter") and "crop layer 1" in err.message


def test_sam_defaults_over_the_budget_stop_the_replica_at_start() -> None:
    with pytest.raises(ValueError, match="max_decoder_prompts"):
        deployment(LIGHT, None, {**SAM_OPTIONS, "points_per_side": 64, "max_decoder_prompts": 100})

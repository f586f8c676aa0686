"""Work budgets and cancellation, on the detector deployments in process (no Ray).

The budget is checked from the image header before decoding, so a header-only PNG of the
service's largest size (50 MP) is enough to see what each parameter set would cost.
"""

from __future__ import annotations

import asyncio
import threading
import time

import cv2
import pytest
from bombs import png_declared
from helpers import shared_file

from serve_app.deployments.budget import check_work
from serve_app.errors import ServiceError
from serve_app.models.pico import PicoParams
from serve_app.registry import MODELS

W50, H50 = 8660, 5773  # 50.0 MP, the service's max_pixels
HEADER_50MP = png_declared(W50, H50)
PICO_WORST = {"min_size": 4, "max_size": 20000, "shift_factor": 0.01, "scale_factor": 1.01}


def deployment(name: str, model_dir, options: dict | None = None):
    cls = MODELS[name].deployment_class().func_or_class
    return cls(name, options or {}, str(model_dir), 50_000_000)


@pytest.fixture(scope="module")
def pico(model_dir):
    shared_file("pico", "facefinder")
    return deployment("face-detect-pigo", model_dir, {"test_delay_param": True})


@pytest.fixture(scope="module")
def haar(model_dir):
    return deployment("face-detect-opencv", model_dir)


def refusal(dep, data: bytes, params: dict) -> ServiceError:
    with pytest.raises(ServiceError) as exc:
        asyncio.run(dep.detect(data, params))
    return exc.value


def test_pico_worst_parameters_on_50mp_are_refused_naming_a_parameter(pico) -> None:
    err = refusal(pico, HEADER_50MP, PICO_WORST)
    print(f"\n{err.message}")
    assert (err.status, err.code) == (422, "over_work_budget")
    assert "shift_factor=0.01" in err.message or "min_size=4" in err.message
    assert "options.max_windows" in err.message


def test_pico_store_parameters_on_50mp_fit_the_budget(pico) -> None:
    assert PicoParams().windows(H50, W50) <= pico.options.max_windows
    # Within budget the request goes on to decoding (this header-only PNG then fails there).
    err = refusal(pico, HEADER_50MP, {})
    assert err.code != "over_work_budget"


def test_pico_many_window_sizes_are_refused_by_max_scales(pico) -> None:
    err = refusal(pico, HEADER_50MP, {"scale_factor": 1.01, "min_size": 200, "max_size": 20000})
    assert err.code == "over_work_budget" and "options.max_scales" in err.message
    assert "scale_factor=1.01" in err.message


def test_haar_fine_pyramid_on_50mp_is_refused_naming_scale_factor(haar) -> None:
    err = refusal(haar, HEADER_50MP, {"scale_factor": 1.01, "min_size": 1})
    print(f"\n{err.message}")
    assert err.code == "over_work_budget" and "scale_factor=1.01" in err.message
    assert refusal(haar, HEADER_50MP, {}).code != "over_work_budget"


def test_blame_goes_to_the_parameter_whose_default_saves_most() -> None:
    def count(p):
        return p["a"] * p["b"]

    with pytest.raises(ServiceError) as exc:
        check_work(count, {"a": 10, "b": 3}, {"a": 1, "b": 2}, ("a", "b"), 5, width=1, height=1)
    assert "a=10" in exc.value.message
    with pytest.raises(ServiceError) as exc:  # all at default: the image is to blame
        check_work(count, {"a": 9, "b": 9}, {"a": 9, "b": 9}, ("a", "b"), 5, width=1, height=1)
    assert "smaller image" in exc.value.message
    assert check_work(count, {"a": 1, "b": 2}, {"a": 1, "b": 2}, ("a",), 5, width=1, height=1) == 2


def cancel_after(dep, data: bytes, params: dict, after_s: float) -> tuple[float, float]:
    """Start a detect call, cancel it after `after_s` (as Serve does when the router times
    out); return (seconds it ran, seconds from the cancel until the model is free again)."""

    async def main() -> tuple[float, float]:
        t0 = time.monotonic()
        task = asyncio.ensure_future(dep.detect(data, params))
        await asyncio.sleep(after_s)
        task.cancel()
        cancelled_at = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The model lock is what the next request needs.
        got = await asyncio.to_thread(dep._model_lock.acquire, True, 30)
        freed = time.monotonic() - cancelled_at
        assert got
        dep._model_lock.release()
        return cancelled_at - t0, freed

    return asyncio.run(main())


def test_a_cancelled_request_frees_the_replica_within_a_second(pico) -> None:
    sample = shared_file("images", "pigo_sample.jpg").read_bytes()
    ran, freed = cancel_after(pico, sample, {"test_delay_s": 60}, 0.5)
    print(f"\ncancelled a 60 s hold after {ran:.2f} s; model free {freed * 1e3:.0f} ms later")
    assert freed < 1.0


def test_a_cancelled_pico_scan_stops_between_bands(pico) -> None:
    truck = shared_file("images", "truck.jpg").read_bytes()
    heavy = {"min_size": 6, "shift_factor": 0.05, "max_size": 1200}  # ~50 M windows
    ran, freed = cancel_after(pico, truck, heavy, 1.0)
    print(f"\npico scan cancelled after {ran:.2f} s; model free {freed * 1e3:.0f} ms later")
    assert freed < 1.0


def test_a_cancelled_haar_scan_stops_between_levels(haar) -> None:
    truck = shared_file("images", "truck.jpg").read_bytes()
    ran, freed = cancel_after(haar, truck, {"scale_factor": 1.02, "min_size": 24}, 1.0)
    print(f"\nhaar scan cancelled after {ran:.2f} s; model free {freed * 1e3:.0f} ms later")
    assert freed < 1.5  # one call covers ~1.5 M windows (~0.5 s here)


def test_haar_scan_in_chunks_finds_what_one_call_finds(haar) -> None:
    from serve_app.models import haar as haar_model

    image = cv2.imread(str(shared_file("images", "skimage_astronaut.png")))
    model = haar.ready_model()
    whole = model.detect(image, scale_factor=1.05, min_size=10, min_neighbors=3)
    old = haar_model.CHUNK_WINDOWS
    haar_model.CHUNK_WINDOWS = 50_000
    try:
        parts = model.detect(
            image, scale_factor=1.05, min_size=10, min_neighbors=3, cancel=threading.Event()
        )
    finally:
        haar_model.CHUNK_WINDOWS = old
    assert whole and sorted(map(repr, whole)) == sorted(map(repr, parts))

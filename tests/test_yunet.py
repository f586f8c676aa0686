"""YuNet (`yunet-face-detection`): the real model through the real service, the multi-scale
plan, face hiding (draw=blur|pixelate) for every detector, and the accuracy harness."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from helpers import SHARED, shared_file

from serve_app.models.yunet import KEEP_MAX, PlanSettings, plan, work_pixels

YUNET = "yunet-face-detection"
DETECTORS = [
    "face-detect-pigo",
    "face-detect-opencv",
    "basic-face-detection",
    "cnn-face-detection",
    YUNET,
]


@pytest.fixture(scope="module")
def yunet_ready(http) -> None:
    """Fail once, clearly, when the weights were not installed from ../shared/data/yunet."""
    shared_file("yunet", "yunet_n_640_640.onnx")
    info = {m["name"]: m for m in http.get("/v1/models").json()["models"]}[YUNET]
    assert info["status"] == "ready", info


def image_bytes(*parts: str) -> bytes:
    return shared_file(*parts).read_bytes()


def decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "answer is not a decodable image"
    return img


def assert_error(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert {"error", "detail"} <= set(body) and body["error"] == code, body
    return body["detail"]


@pytest.fixture(scope="module")
def portrait_12mp() -> bytes:
    """pigo_sample.jpg upscaled 9.7x: 3104 x 3880 (12.0 MP), one face of ~1900 x 2600 px."""
    img = decode(image_bytes("images", "pigo_sample.jpg"))
    big = cv2.resize(img, (3104, 3880), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


# -- the multi-scale plan (pure) ---------------------------------------------------------
def test_plan_default_adds_a_large_face_pass_only_when_faces_can_outgrow_the_main_pass():
    s = PlanSettings()
    assert [p.name for p in plan(320, 400, small_faces=False, settings=s)] == ["main"]
    passes = plan(1024, 768, small_faces=False, settings=s)
    assert [p.name for p in passes] == ["main", "large"]
    main, large = passes
    assert main.scale == 1.0 and main.keep_min == 0 and large.keep_max == np.inf
    # The two keep ranges overlap (NMS merges what both kept), so no size falls in a gap.
    assert large.keep_min < main.keep_max
    assert work_pixels(passes) == 1024 * 768 + large.pixels


def test_plan_scales_large_photos_down_and_small_faces_adds_an_upscaled_pass():
    s = PlanSettings(max_side=1280, large_side=320, small_scale=2.0)
    main, large = plan(4000, 3000, small_faces=False, settings=s)
    assert (main.width, main.height) == (1280, 960) and large.width == 320
    small, main, large = plan(1024, 768, small_faces=True, settings=s)
    assert small.scale == 2.0 and small.keep_min == 0
    assert small.keep_max == KEEP_MAX["small"] / 2.0 > main.keep_min  # overlapping ranges
    assert work_pixels([small, main, large]) > 5 * 1024 * 768


def test_tiles_overlap_enough_and_their_cores_split_the_image():
    from serve_app.models import yunet as Y

    for length in (1281, 2048, 2600, 5000):
        starts, side = Y._tiles(length)
        assert side <= Y.TILE_SIDE and starts[0] == 0 and starts[-1] + side == length
        # Few tiles: their pixels exceed the axis by the overlaps only.
        assert len(starts) * side <= length + len(starts) * Y.TILE_OVERLAP
        for a, b in zip(starts, starts[1:], strict=False):
            assert a + side - b >= Y.TILE_OVERLAP  # a kept face fits in the overlap
        cores = [Y._core(starts, side, k, 1.0) for k in range(len(starts))]
        assert cores[0][0] == -np.inf and cores[-1][1] == np.inf
        for (_, hi), (lo, _) in zip(cores, cores[1:], strict=False):
            assert hi == lo  # no gap, no double count
        half = Y.KEEP_MAX["small"] / 2
        for k, (lo, hi) in enumerate(cores):  # a face centred in a core lies inside its tile
            assert k == 0 or lo - half >= starts[k]
            assert k == len(starts) - 1 or hi + half <= starts[k] + side


def test_tiled_small_face_pass_finds_what_the_whole_upscaled_image_does():
    from bench.accuracy import iou, load_dataset
    from serve_app.models import yunet as Y

    data = SHARED / "faces-dev"
    if not (data / "annotations.json").is_file():
        pytest.skip(f"{data} is absent: the faces-dev set (../shared/data) is not here")
    model = shared_file("yunet", "yunet_n_640_640.onnx")
    sample = load_dataset(data)[3]
    img = cv2.imread(str(sample.path))
    h, w = img.shape[:2]
    net = Y.YuNet(model)
    limit = Y.KEEP_MAX["small"] / 2
    tiled = net._run_pass(img, Y.ScalePass("small", 2.0, 0, limit, 2 * w, 2 * h), 0.7)
    whole = net._run_pass(img, Y.ScalePass("small", 2.0, 0, np.inf, 2 * w, 2 * h), 0.7)
    tiled, whole = ([r for r in rows if max(r[2], r[3]) < limit] for rows in (tiled, whole))
    assert len(whole) > 20  # a crowd: the comparison means something
    # Not identical: a tile gives the net other context (and padding) near its edges, which
    # moves scores around the threshold. Measured on this image: 51 vs 47 faces, 45 shared.
    same = sum(any(iou(tuple(a[:4]), tuple(b[:4])) > 0.5 for b in whole) for a in tiled)
    assert abs(len(tiled) - len(whole)) <= 0.15 * len(whole) and same >= 0.85 * len(tiled)


# -- the model through the service -------------------------------------------------------
@pytest.mark.parametrize("name", ["pigo_sample.jpg", "skimage_astronaut.png"])
def test_one_face_with_five_landmarks_inside_its_box(http, yunet_ready, name):
    r = http.post(f"/v1/detect/{YUNET}", content=image_bytes("images", name))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == YUNET and body["count"] == 1, body["faces"]
    face = body["faces"][0]
    assert set(face) == {"x", "y", "w", "h", "score", "landmarks"}
    assert 0.7 <= face["score"] <= 1.0
    assert len(face["landmarks"]) == 5
    for x, y in face["landmarks"]:
        assert face["x"] <= x <= face["x"] + face["w"] and face["y"] <= y <= face["y"] + face["h"]
    (rex, rey), (lex, ley), (nx, ny), (rmx, rmy), (lmx, lmy) = face["landmarks"]
    # Anatomy, not just containment: eyes above the nose tip above the mouth corners.
    assert rex < lex and rmx < lmx and max(rey, ley) < ny < min(rmy, lmy)
    assert body["parameters"] == {
        "score_threshold": 0.7,
        "nms_threshold": 0.3,
        "small_faces": False,
        "max_side": 1280,
    }


@pytest.mark.parametrize("name", ["skimage_chelsea.png", "skimage_coffee.png", "dog.jpg"])
def test_no_face_in_pictures_without_one(http, yunet_ready, name):
    r = http.post(f"/v1/detect/{YUNET}", content=image_bytes("images", name))
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 0, r.json()["faces"]


def test_12mp_portrait_finds_its_one_face(http, yunet_ready, portrait_12mp):
    r = http.post(f"/v1/detect/{YUNET}", content=portrait_12mp)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (3104, 3880)
    assert body["count"] == 1, body["faces"]
    face = body["faces"][0]
    # The face of pigo_sample (about 190 x 270 px there) scaled by 9.7.
    assert face["w"] > 1200 and face["h"] > 1800
    assert abs(face["x"] + face["w"] / 2 - 156 * 9.7) < 400


def test_work_budget_refuses_with_the_parameters_named(http, yunet_ready, portrait_12mp):
    r = http.post(f"/v1/detect/{YUNET}?max_side=8192&small_faces=true", content=portrait_12mp)
    detail = assert_error(r, 422, "over_work_budget")
    assert "max_side" in detail and "small_faces" in detail and "max_work_pixels" in detail
    # The replica is still there and answers the same image within the budget.
    assert (
        http.post(f"/v1/detect/{YUNET}?small_faces=true", content=portrait_12mp).status_code == 200
    )


@pytest.mark.parametrize(
    "query",
    [
        "score_threshold=0",
        "score_threshold=1.5",
        "nms_threshold=abc",
        "max_side=10",
        "max_side=100000",
        "small_faces=maybe",
        "landmarks=2",
        "draw=sepia",
        "colour=red",
    ],
)
def test_parameter_bounds_answer_422(http, yunet_ready, query):
    r = http.post(f"/v1/detect/{YUNET}?{query}", content=image_bytes("images", "pigo_sample.jpg"))
    code = "unknown_parameter" if query.startswith("colour") else "bad_parameter"
    detail = assert_error(r, 422, code)
    assert query.split("=")[0] in detail


def test_models_lists_yunet_with_its_parameters(http, yunet_ready):
    info = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    params = info[YUNET]["parameters"]
    assert {
        "score_threshold",
        "nms_threshold",
        "small_faces",
        "max_side",
        "draw",
        "landmarks",
    } <= set(params)
    assert params["draw"]["choices"] == ["box", "blur", "pixelate"]
    for name in DETECTORS:  # every detector can hide faces
        assert info[name]["parameters"]["draw"]["default"] == "box"


def test_function_route_answers_the_boxed_jpeg(http, yunet_ready):
    sample = image_bytes("images", "pigo_sample.jpg")
    r = http.post(f"/function/{YUNET}", content=sample)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg" and r.headers["x-count"] == "1"
    boxed = decode(r.content)
    assert boxed.shape == decode(sample).shape
    plain = decode(http.post(f"/function/{YUNET}?landmarks=false", content=sample).content)
    # The landmarks are drawn: the two pictures differ, and only near the face.
    assert np.abs(boxed.astype(int) - plain.astype(int)).max() > 100


def test_openfaas_listing_has_yunet(http):
    names = {f["name"] for f in http.get("/system/functions").json()}
    assert YUNET in names


# -- hiding faces, for every detector ----------------------------------------------------
@pytest.mark.parametrize("draw", ["blur", "pixelate"])
@pytest.mark.parametrize("model", DETECTORS)
def test_draw_hides_the_faces_and_leaves_the_rest(http, yunet_ready, model, draw):
    sample = image_bytes("images", "pigo_sample.jpg")
    original = decode(sample)
    faces = http.post(f"/v1/detect/{model}", content=sample).json()["faces"]
    assert faces, f"{model} finds no face on pigo_sample.jpg: nothing to hide"
    r = http.post(f"/v1/detect/{model}?format=png&draw={draw}", content=sample)
    assert r.status_code == 200, r.text
    out = decode(r.content)  # PNG: exact pixels
    inside = np.zeros(original.shape[:2], bool)
    for f in faces:
        inside[f["y"] : f["y"] + f["h"], f["x"] : f["x"] + f["w"]] = True
    assert np.array_equal(out[~inside], original[~inside]), "pixels outside the faces changed"
    diff = np.abs(out.astype(int) - original.astype(int))
    for f in faces:
        region = diff[f["y"] : f["y"] + f["h"], f["x"] : f["x"] + f["w"]]
        assert region.mean() > 4, f"{model} {draw}: the face at {f} is barely changed"
    # No box drawn: hiding replaces boxing.
    boxed = decode(http.post(f"/v1/detect/{model}?format=png", content=sample).content)
    assert not np.array_equal(boxed, out)


# -- the accuracy harness ------------------------------------------------------------------
def test_harness_gives_the_same_figures_in_process_and_over_http(service, yunet_ready, tmp_path):
    from bench import accuracy

    data = SHARED / "faces-dev"
    if not (data / "annotations.json").is_file():
        pytest.skip(f"{data} is absent: the faces-dev set (../shared/data) is not here")
    common = ["--model", YUNET, "--data", str(data), "--limit", "5", "--out", str(tmp_path)]
    assert accuracy.main([*common, "--url", service["url"], "--tag", "http"]) == 0
    assert (
        accuracy.main(
            [*common, "--in-process", "--model-dir", str(service["model_dir"]), "--tag", "local"]
        )
        == 0
    )
    http_run = json.loads((tmp_path / "http.json").read_text())
    local = json.loads((tmp_path / "local.json").read_text())
    assert (tmp_path / "http.png").stat().st_size > 0
    assert http_run["images"] == local["images"] == 5
    a, b = http_run["results"][YUNET], local["results"][YUNET]
    assert a["overall"]["gt"] > 0 and a["overall"]["tp"] > 0
    for key in ("overall", "buckets", "curve"):
        assert a[key] == b[key], key

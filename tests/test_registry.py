"""The model registry: every other list of models is derived from it, and it stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.config import load_config, validate_options, weights_needed
from serve_app.models.weights import REGISTRY as WEIGHTS
from serve_app.registry import MODELS, names_of

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_configures_every_registered_model():
    cfg = load_config()
    args = cfg["applications"][0]["args"]
    deployments = {d["name"] for d in cfg["applications"][0]["deployments"]}
    assert set(args["models"]) == set(MODELS)
    assert set(MODELS) <= deployments


@pytest.mark.parametrize("name", list(MODELS))
def test_each_entry_is_complete(name):
    spec = MODELS[name]
    assert spec.name == name and spec.kind in ("detector", "segmenter")
    assert spec.default_output in ("json", "jpeg", "png", "base64")
    assert len(spec.box_color) == 7 and spec.box_color.startswith("#")
    assert all(0 <= c <= 255 for c in spec.box_bgr())
    options = validate_options(
        name, load_config()["applications"][0]["args"]["models"][name].get("options", {})
    )
    assert all(w in WEIGHTS for w in spec.weights(options))


def test_weights_follow_the_options():
    pigo, cnn, sam = (MODELS[n] for n in ("face-detect-pigo", "cnn-face-detection", "sam-mobile"))
    assert pigo.weights(pigo.options()) == ["facefinder"]
    assert cnn.weights(cnn.options(weights="x", prototxt="y")) == ["x", "y"]
    assert sam.weights(sam.options(variant="mobile", weights="mobile_sam")) == ["mobile_sam"]
    assert (
        sam.weights(sam.options(variant="mobile", weights="mobile_sam", random_weights=True)) == []
    )
    assert MODELS["face-detect-opencv"].weights(MODELS["face-detect-opencv"].options()) == []


def test_weights_needed_skips_disabled_models():
    cfg = load_config()
    needed = weights_needed(cfg)
    assert "sam_vit_h" not in needed  # disabled in the shipped config
    assert {"facefinder", "res10_ssd", "res10_prototxt", "sam_vit_b"} <= set(needed)
    assert weights_needed(cfg, ["face-detect-pigo"]) == ["facefinder"]


def test_colours_match_what_the_seed_drew():
    assert MODELS["basic-face-detection"].box_bgr() == (255, 0, 0)  # the seed's blue
    assert MODELS["face-detect-opencv"].box_bgr() == (0, 255, 0)


def test_kinds_partition_the_registry():
    assert sorted(names_of("detector") + names_of("segmenter")) == sorted(MODELS)


def test_reading_the_registry_imports_neither_ray_nor_torch_nor_opencv():
    code = (
        "import sys\n"
        "from serve_app.config import load_config, weights_needed\n"
        "from serve_app.registry import MODELS\n"
        "weights_needed(load_config())\n"
        "heavy = {'ray', 'torch', 'cv2', 'serve_app.app'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_deployment_classes_load_by_path():
    for name in names_of("detector"):
        cls = MODELS[name].deployment_class()
        assert cls.func_or_class.__name__ == MODELS[name].deployment.rpartition(":")[2]

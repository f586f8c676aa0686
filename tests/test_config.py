"""The strict config validator: the shipped config passes, every kind of mistake is refused."""

from __future__ import annotations

import copy

import pytest

from serve_app.app import build_app
from serve_app.config import ConfigError, load_config, main, validate_config
from serve_app.launch import with_overrides


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_config()


def test_shipped_config_is_valid(cfg):
    settings = validate_config(cfg)
    assert "cnn-face-detection" in settings.enabled_models()
    assert not settings.models["sam-vit-h"].enabled
    assert main(["check"]) == 0


def test_shipped_config_fits_a_two_core_laptop(cfg):
    """min_replicas of everything must fit what Ray offers a 2-core, 24 GB machine."""
    deps = cfg["applications"][0]["deployments"]
    cpus = sum(
        d["ray_actor_options"]["num_cpus"] * d["autoscaling_config"]["min_replicas"] for d in deps
    )
    mem = sum(
        d["ray_actor_options"]["memory"] * d["autoscaling_config"]["min_replicas"] for d in deps
    )
    assert cpus <= 2.0
    assert mem <= 12 * 2**30  # Ray offers ~14.8 GiB on an idle 24 GB machine, less on a busy one


def _mutate(cfg, fn):
    bad = copy.deepcopy(cfg)
    fn(bad)
    return bad


def _dep(cfg, name):
    return next(d for d in cfg["applications"][0]["deployments"] if d["name"] == name)


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda c: c.__setitem__("http_optons", {}), "unknown key"),
        (lambda c: c["http_options"].__setitem__("request_timeout", 5), "unknown key"),
        (lambda c: _dep(c, "router").__setitem__("max_ongoing", 5), "unknown key"),
        (lambda c: _dep(c, "router")["ray_actor_options"].__setitem__("num_cpu", 1), "unknown key"),
        (
            lambda c: _dep(c, "router")["autoscaling_config"].__setitem__("max_replica", 1),
            "unknown key",
        ),
        (lambda c: _dep(c, "router")["ray_actor_options"].pop("memory"), "num_cpus and memory"),
        (lambda c: _dep(c, "router").pop("max_queued_requests"), "max_queued_requests"),
        (lambda c: c["applications"][0]["args"].__setitem__("limitz", {}), "limitz"),
        (
            lambda c: c["applications"][0]["args"]["limits"].__setitem__("max_pixels", -1),
            "max_pixels",
        ),
        (
            lambda c: c["applications"][0]["args"]["models"].__setitem__("face-detect-x", {}),
            "unknown model",
        ),
        (lambda c: c["applications"][0]["deployments"].pop(), "missing"),
        (lambda c: c["http_options"].__setitem__("request_timeout_s", 10), "request_timeout_s"),
        (
            lambda c: _dep(c, "sam-vit-h")["autoscaling_config"].__setitem__("min_replicas", 1),
            "disabled model",
        ),
    ],
)
def test_mistakes_are_refused(cfg, mutation, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_mutate(cfg, mutation))


def test_model_options_are_strict(cfg):
    bad = with_overrides(cfg, models={"cnn-face-detection": {"options": {"confidance": 0.5}}})
    with pytest.raises(ConfigError, match="confidance"):
        build_app(bad["applications"][0]["args"])


def test_with_overrides_removes_a_model_everywhere(cfg):
    small = with_overrides(cfg, models={"sam-vit-h": None})
    validate_config(small)
    assert "sam-vit-h" not in small["applications"][0]["args"]["models"]
    assert "sam-vit-h" in cfg["applications"][0]["args"]["models"]  # original untouched

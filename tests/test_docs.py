"""The docs agree with the code: every model and weight file is documented, every linked doc
exists, and the figures the docs quote from `config/serve.yaml` are the config's own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serve_app.config import load_config, parse_app_settings

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "models" / "README.md"]


def _model_names() -> list[str]:
    from serve_app.registry import MODELS

    return list(MODELS)


def _table_first_cells(text: str) -> set[str]:
    """The backquoted names in the first cell of every Markdown table row."""
    names = set()
    for line in text.splitlines():
        if line.startswith("|"):
            names.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def test_every_model_is_in_the_readme_models_table() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Models", 1)[1].split("\n## ", 1)[0]
    missing = set(_model_names()) - _table_first_cells(section)
    assert not missing, f"README.md's Models table lacks {sorted(missing)}"


def test_every_weight_file_is_in_models_readme() -> None:
    from serve_app.models.weights import REGISTRY

    documented = _table_first_cells((REPO / "models" / "README.md").read_text())
    missing = set(REGISTRY) - documented
    assert not missing, f"models/README.md's table lacks {sorted(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if "://" in target:
            continue
        if not (doc.parent / target).exists():
            broken.append(target)
    assert not broken, f"{doc.name} links to missing files: {broken}"


def test_readme_is_short() -> None:
    assert (REPO / "README.md").stat().st_size <= 15 * 1024


def _min_replica_sums(cfg: dict) -> tuple[float, float]:
    app = cfg["applications"][0]
    settings = parse_app_settings(app.get("args"))
    enabled = set(settings.enabled_models()) | {"router", "jobs"}
    cpus = mem = 0.0
    for dep in app["deployments"]:
        if dep["name"] not in enabled:
            continue
        n = dep["autoscaling_config"].get("min_replicas", 1)
        cpus += n * dep["ray_actor_options"]["num_cpus"]
        mem += n * dep["ray_actor_options"]["memory"]
    return cpus, mem / 2**30


def test_quoted_memory_and_cpu_sums_match_the_config() -> None:
    text = (REPO / "docs" / "maintenance.md").read_text()
    found = re.search(r"sums to\s+([\d.]+) CPUs and ([\d.]+) GiB", text)
    assert found, "docs/maintenance.md no longer quotes the laptop config's sums"
    cpus, gib = _min_replica_sums(load_config())
    assert float(found[1]) == pytest.approx(cpus, abs=0.01)
    assert float(found[2]) == pytest.approx(gib, abs=0.05)


def test_quoted_downscale_delays_match_the_config() -> None:
    delays = {
        d["autoscaling_config"].get("downscale_delay_s", 600)
        for d in load_config()["applications"][0]["deployments"]
    }
    for doc in DOCS:
        for quoted in re.findall(r"downscale_delay_s:?`?\s*\(?(\d+)", doc.read_text()):
            assert int(quoted) in delays, (
                f"{doc.name} quotes downscale_delay_s {quoted}; the config has {sorted(delays)}"
            )

"""`visionserve detect MODEL DIR... --out DIR`: folder mode against the running test service.

The CLI runs as a subprocess from this checkout (`python -m serve_app.client.cli` with this
checkout first on PYTHONPATH), so exit codes, progress output and a real SIGKILL are real.
The kill is deterministic: a test hook makes the CLI kill itself after N written outputs.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import REPO, shared_file

from serve_app.client.folder import KILL_AFTER_ENV

MODEL = "face-detect-pigo"
SOURCES = (
    "pigo_sample.jpg",
    "skimage_astronaut.png",
    "skimage_camera.png",
    "skimage_chelsea.png",
    "skimage_coffee.png",
    "dog.jpg",
)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    base = {k: v for k, v in os.environ.items() if not k.startswith("VISIONSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "serve_app.client.cli", *args],
        capture_output=True,
        text=True,
        env={**base, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})},
        timeout=timeout,
    )


def decodable(path: Path) -> bool:
    return cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR) is not None


@pytest.fixture()
def photos(tmp_path) -> Path:
    """40 copies of the shared images, some in a subfolder (as a user's photo folder)."""
    src = [shared_file("images", name) for name in SOURCES]
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for i, path in zip(range(40), itertools.cycle(src)):
        where = folder / "trip" if i % 3 == 0 else folder
        shutil.copy(path, where / f"img{i:03d}{path.suffix}")
    return folder


def test_folder_mode_writes_every_output_and_resumes_after_a_kill(service, photos, tmp_path):
    out, log = tmp_path / "boxed", tmp_path / "faces.jsonl"
    args = [
        "--url",
        service["url"],
        "detect",
        MODEL,
        str(photos),
        "--out",
        str(out),
        "--json",
        str(log),
        "--batch",
        "4",
        "--in-flight",
        "2",
    ]

    first = cli(*args, env={KILL_AFTER_ENV: "12"})
    assert first.returncode == -signal.SIGKILL, first.stderr
    written = sorted(out.rglob("*.jpg"))
    assert len(written) == 12  # exactly the finished ones, each whole
    assert all(decodable(p) for p in written)
    before = {p: p.stat().st_mtime_ns for p in written}

    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert "40 images: 28 done, 12 skipped (output exists), 0 failed" in second.stdout
    assert "images/s" in second.stderr and "ETA" in second.stderr  # the progress lines
    assert "28/28 images (100%)" in second.stderr
    outputs = sorted(out.rglob("*.jpg"))
    assert len(outputs) == 40 and all(decodable(p) for p in outputs)
    assert {p.relative_to(out) for p in outputs} == {
        p.relative_to(photos).with_suffix(".jpg") for p in photos.rglob("*.*")
    }
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished ones not redone
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["source"] for r in rows} == {str(p) for p in photos.rglob("*.*")}
    assert all(r["model"] == MODEL and "image_base64" not in r for r in rows)
    face = next(r for r in rows if r["source"].endswith("img000.jpg"))
    assert face["count"] == 1 and face["output"].endswith("trip/img000.jpg")

    third = cli(*args)  # nothing left to do
    assert third.returncode == 0 and "0 done, 40 skipped" in third.stdout, third.stdout


def test_failed_images_exit_non_zero_with_a_summary(service, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(shared_file("images", "pigo_sample.jpg"), folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)
    out = tmp_path / "out"
    r = cli(
        "--url",
        service["url"],
        "detect",
        MODEL,
        str(folder / "*.jpg"),
        "--out",
        str(out),
        "--draw",
        "pixelate",
    )
    assert r.returncode == 4, r.stderr
    assert "2 images: 1 done, 0 skipped (output exists), 1 failed" in r.stdout
    assert "broken.jpg: 422" in r.stderr and "bad_image" not in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["good.jpg"]
    # The failed one has no output, so the next run tries it again and skips the good one.
    r = cli("--url", service["url"], "detect", MODEL, str(folder), "--out", str(out))
    assert r.returncode == 4 and "0 done, 1 skipped" in r.stdout, r.stdout


def test_json_only_resumes_from_the_jsonl(service, photos, tmp_path):
    log = tmp_path / "only.jsonl"
    args = ["--url", service["url"], "detect", MODEL, str(photos / "trip"), "--json", str(log)]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    count = len(log.read_text().splitlines())
    assert count == len(list((photos / "trip").iterdir()))
    second = cli(*args)
    assert second.returncode == 0 and f"0 done, {count} skipped" in second.stdout
    assert len(log.read_text().splitlines()) == count
    third = cli(*args, "--overwrite")
    assert f"{count} done, 0 skipped" in third.stdout
    assert len(log.read_text().splitlines()) == count  # --overwrite starts the file afresh


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "needs --out DIR and/or --json FILE"),
        (["--out", "o", "-o", "x.jpg"], "not -o"),
        (["--out", "o", "--batch", "0"], "at least 1"),
    ],
)
def test_folder_mode_usage_errors(photos, tmp_path, extra, message):
    r = cli("--url", "http://127.0.0.1:9", "detect", MODEL, str(photos), *extra, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr

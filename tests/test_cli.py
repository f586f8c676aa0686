"""The `visionserve` command against the running test service, as a user runs it.

Flag mode goes through a subprocess (the installed console script), interactive mode
through a pseudo-terminal (pexpect), so prompts, progress output and exit codes are real.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pexpect
import pytest
from helpers import shared_file

from serve_app.launch import free_port

SAM_LIGHT = "sam-segmentation-light"  # tiny random-weight ViT in the test service
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT = Path(sys.executable).with_name("visionserve")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "serve_app.client.cli"]


def clean_env() -> dict[str, str]:
    # The developer's own settings must not leak into what the tests check.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIONSERVE_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=False,
        cwd=cwd,
        env={**clean_env(), **(env or {})},
        timeout=timeout,
    )


def text(out: bytes) -> str:
    return out.decode("utf-8", "replace")


def image_size(path: Path) -> tuple[int, int]:
    img = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a decodable image"
    return img.shape[1], img.shape[0]


@pytest.fixture(scope="module")
def sample() -> Path:
    return shared_file("images", "pigo_sample.jpg")


@pytest.fixture(scope="module")
def url(service) -> str:
    return service["url"]


# -- usage and failures -----------------------------------------------------------------
def test_unreachable_service_exits_3_and_says_how_to_start_it(sample, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = cli(
        "--url",
        url,
        "detect",
        "cnn-face-detection",
        str(sample),
        "-o",
        "x.jpg",
        cwd=tmp_path,
        timeout=60,
    )
    err = text(r.stderr)
    assert r.returncode == 3, err
    assert url in err and "connection refused" in err and "make run" in err
    assert not (tmp_path / "x.jpg").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["detect", "cnn-face-detection", "/no/such/file.jpg"], "no such file"),
        (["detect", "cnn-face-detection", "{img}", "--param", "confidence"], "NAME=VALUE"),
        (["detect", "cnn-face-detection", "{img}", "-o", "out.gif"], ".jpg, .jpeg or .png"),
        (["segment", SAM_LIGHT, "{img}", "--points", "1,2", "--labels", "1,0"], "0/1 values"),
        (["segment", SAM_LIGHT, "{img}", "--box", "1,2,3"], "4 comma-separated"),
        (["detect"], "required"),
    ],
)
def test_usage_errors_exit_2(sample, tmp_path, args, message):
    r = cli(
        "--url",
        "http://127.0.0.1:9",
        *[a.format(img=sample) for a in args],
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 2, text(r.stderr)
    assert message in text(r.stderr)


def test_unknown_model_exits_4_with_the_services_detail(url, sample, tmp_path):
    r = cli("--url", url, "detect", "no-such-model", str(sample), "-o", "x.jpg", cwd=tmp_path)
    err = text(r.stderr)
    assert r.returncode == 4, err
    assert "404 unknown_model" in err and "cnn-face-detection" in err  # lists the known ones


def test_out_of_range_parameter_exits_4(url, sample, tmp_path):
    r = cli(
        "--url",
        url,
        "detect",
        "cnn-face-detection",
        str(sample),
        "--json",
        "--param",
        "confidence=7",
        cwd=tmp_path,
    )
    assert r.returncode == 4, text(r.stderr)
    assert "bad_parameter" in text(r.stderr) and "confidence" in text(r.stderr)


def test_missing_weights_exits_5_with_the_fetch_command(url, sample, tmp_path):
    # sam-vit-h is enabled in the test service without its weights: the service answers 503.
    r = cli(
        "--url",
        url,
        "segment",
        "sam-vit-h",
        str(sample),
        "--points",
        "160,200",
        "-o",
        "x.png",
        cwd=tmp_path,
    )
    err = text(r.stderr)
    assert r.returncode == 5, err
    assert "503 weights_missing" in err and "python -m serve_app.models fetch sam_vit_h" in err


class _KeyedModels(http.server.BaseHTTPRequestHandler):
    """/v1/models behind a bearer key, as the service answers once API keys are on."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.headers.get("Authorization") == "Bearer right-key":
            status, body = (
                200,
                {
                    "models": [
                        {"name": "m", "kind": "detector", "status": "ready", "parameters": {}}
                    ]
                },
            )
        else:
            status, body = 401, {"error": "unauthorized", "detail": "missing or wrong API key"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_api_key_is_sent_as_a_bearer_token():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeyedModels)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        r = cli("--url", url, "models", timeout=60)
        assert r.returncode == 4
        assert "401 unauthorized: missing or wrong API key" in text(r.stderr)
        assert "--api-key or VISIONSERVE_API_KEY" in text(r.stderr)
        r = cli("--url", url, "models", env={"VISIONSERVE_API_KEY": "right-key"}, timeout=60)
        assert r.returncode == 0 and text(r.stdout).splitlines()[1].startswith("m ")
        r = cli("--url", url, "models", "--api-key", "right-key", timeout=60)
        assert r.returncode == 0
    finally:
        server.shutdown()
        server.server_close()


# -- flag mode ----------------------------------------------------------------------------
def test_models_lists_every_model(service, url):
    r = cli("models", "--url", url)  # options also work after the subcommand
    out = text(r.stdout)
    assert r.returncode == 0, text(r.stderr)
    configured = service["config"]["applications"][0]["args"]["models"]
    for name in configured:
        assert re.search(rf"^{re.escape(name)}\s+(detector|segmenter)\s", out, re.M), out
    # test_delay_s: the test config's fixed service time (tests/test_faults.py)
    assert re.search(
        r"^cnn-face-detection\s+detector\s+ready\s+confidence, (test_delay_s, )?draw$", out, re.M
    ), out

    r = cli("--url", url, "models", "--json")
    models = {m["name"]: m for m in json.loads(r.stdout)["models"]}
    assert set(models) == set(configured)


def test_detect_writes_the_annotated_jpeg(url, sample, tmp_path):
    r = cli(
        "--url", url, "detect", "cnn-face-detection", str(sample), "-o", "boxes.jpg", cwd=tmp_path
    )
    assert r.returncode == 0, text(r.stderr)
    out = tmp_path / "boxes.jpg"
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"
    assert image_size(out) == (320, 400)
    assert "Saved the annotated image to boxes.jpg (1 face)" in text(r.stdout)


def test_detect_json_prints_one_face(url, sample, tmp_path):
    r = cli(
        "--url",
        url,
        "detect",
        "cnn-face-detection",
        str(sample),
        "--json",
        "--param",
        "confidence=0.5",
        cwd=tmp_path,
    )
    assert r.returncode == 0, text(r.stderr)
    body = json.loads(r.stdout)  # stdout is nothing but the JSON answer
    assert body["model"] == "cnn-face-detection" and body["filename"] == "pigo_sample.jpg"
    assert body["count"] == 1 and len(body["faces"]) == 1
    assert body["parameters"] == {"confidence": 0.5}
    assert list(tmp_path.iterdir()) == []  # --json alone saves nothing


def test_detect_url_image_with_json_and_output(url, sample_url, tmp_path):
    image = sample_url  # fetched by the service, not by the CLI
    r = cli(
        "--url", url, "detect", "face-detect-pigo", image, "--json", "-o", "p.png", cwd=tmp_path
    )
    assert r.returncode == 0, text(r.stderr)
    assert json.loads(r.stdout)["count"] == 1
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    assert "Saved the annotated image to p.png (1 face)" in text(r.stderr)


def test_detect_default_output_name(url, sample, tmp_path):
    r = cli("--url", url, "detect", "face-detect-opencv", str(sample), cwd=tmp_path)
    assert r.returncode == 0, text(r.stderr)
    assert image_size(tmp_path / "pigo_sample-face-detect-opencv.jpg") == (320, 400)


# -- interactive mode ----------------------------------------------------------------------
def spawn(url: str, cwd: Path, *args: str) -> pexpect.spawn:
    return pexpect.spawn(
        COMMAND[0],
        [*COMMAND[1:], "--url", url, *args],
        cwd=str(cwd),
        env=clean_env(),
        encoding="utf-8",
        timeout=120,
    )


def test_interactive_detect_through_a_terminal(url, sample, tmp_path):
    child = spawn(url, tmp_path)
    child.expect(r"Functions:")
    child.expect(r"(\d+)\. cnn-face-detection\s+detector\s+ready")
    number = child.match.group(1)
    child.expect(r"Function \(1-\d+ or name\): ")
    child.sendline("99")  # a wrong answer is asked again, not fatal
    child.expect("no function '99'")
    child.expect(r"Function \(1-\d+ or name\): ")
    child.sendline(number)
    child.expect("Image URL or file path: ")
    child.sendline(str(sample))
    child.expect(re.escape("Output file [pigo_sample-cnn-face-detection.jpg]: "))
    child.sendline("")  # take the default
    child.expect(pexpect.EOF)
    child.close()
    out = child.before
    assert child.exitstatus == 0, out
    assert "cnn-face-detection: 1 face found (320x400 image)" in out
    assert re.search(r"1\. box x=\d+ y=\d+ w=\d+ h=\d+\s+score [01]\.\d{3}", out), out
    saved = tmp_path / "pigo_sample-cnn-face-detection.jpg"
    assert f"Saved the annotated image to {saved.name} (1 face)" in out
    assert image_size(saved) == (320, 400)


def test_interactive_refuses_a_model_without_weights(url, sample, tmp_path):
    child = spawn(url, tmp_path)
    child.expect(r"Function \(1-\d+ or name\): ")
    child.sendline("sam-vit-h")
    child.expect("sam-vit-h is missing weights")
    child.expect("fetch its weights with: .*serve_app.models fetch sam_vit_h")
    child.expect(r"Function \(1-\d+ or name\): ")
    child.sendeof()  # giving up is a usage exit, and nothing runs
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2


# -- Segment Anything (tiny random weights: any mask count is right) ------------------------
def test_segment_automatic_shows_progress_and_writes_png(url, sample, tmp_path, sam_ready):
    r = cli(
        "--url",
        url,
        "segment",
        SAM_LIGHT,
        str(sample),
        "-o",
        "auto.png",
        "--param",
        "points_per_side=4",
        cwd=tmp_path,
    )
    err = text(r.stderr)
    assert r.returncode == 0, err
    assert re.search(rf"{SAM_LIGHT}: 100% done", err), err  # the job's progress lines
    out = tmp_path / "auto.png"
    assert out.read_bytes()[:8] == PNG_MAGIC and image_size(out) == (320, 400)
    assert re.search(r"Saved the mask overlay to auto.png \(\d+ masks?\)", text(r.stdout))


def test_segment_prompted_json_and_png(url, sample, tmp_path, sam_ready):
    r = cli(
        "--url",
        url,
        "segment",
        SAM_LIGHT,
        str(sample),
        "--points",
        "160,200",
        "60,60",
        "--labels",
        "1,0",
        "--json",
        "-o",
        "prompted.png",
        cwd=tmp_path,
    )
    assert r.returncode == 0, text(r.stderr)
    body = json.loads(r.stdout)
    assert (body["width"], body["height"]) == (320, 400)
    assert body["count"] == len(body["masks"]) >= 0
    for mask in body["masks"]:
        assert mask["segmentation"]["size"] == [400, 320]
    assert image_size(tmp_path / "prompted.png") == (320, 400)
    assert "%" not in text(r.stderr)  # prompted calls are direct: no job, no progress bar


def test_interactive_segment_shows_a_live_progress_bar(url, sample, tmp_path, sam_ready):
    child = spawn(url, tmp_path, "interactive", "--param", "points_per_side=4")
    child.expect(r"Function \(1-\d+ or name\): ")
    child.sendline(SAM_LIGHT)
    child.expect("Image URL or file path: ")
    child.sendline(str(sample))
    child.expect(re.escape(f"Output file [pigo_sample-{SAM_LIGHT}.png]: "))
    child.sendline("masks")  # no extension: the segmenter's .png is added
    child.expect(r"\[#+\] 100% done")
    child.expect(r"Saved the mask overlay to masks.png \(\d+ masks?\)")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "masks.png").read_bytes()[:8] == PNG_MAGIC
    assert image_size(tmp_path / "masks.png") == (320, 400)

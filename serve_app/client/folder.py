"""Folder mode: a detector over many local images, in batches, resumable.

    visionserve detect face-detect-pigo photos/ 'more/**/*.jpg' --out boxed/ --json faces.jsonl

Walks the inputs (folders recursively, glob patterns, files), skips every image whose output
already exists (unless --overwrite), and sends the rest to `/v1/detect/{model}/batch` a batch
at a time with a bounded number of batches in flight. Each output is written whole or not at
all (a temporary file renamed into place), so a run killed half-way leaves only finished
outputs and the next run picks up where it stopped. A failed image gets no output and is
listed in the summary; the exit code is then non-zero.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import glob
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from serve_app.client.service import (
    EXIT_FAILED,
    EXIT_LOCAL,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_USAGE,
    ClientError,
    Service,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
OUTPUT_SUFFIX = ".jpg"
# A batch stops growing at this many bytes, well under the service's default 50 MiB body.
MAX_BATCH_BYTES = 24 * 2**20
# Test hook: SIGKILL this process right after it has written N outputs (a deterministic
# "killed half-way" for the resume test; never set in normal use).
KILL_AFTER_ENV = "VISIONSERVE_TEST_KILL_AFTER_OUTPUTS"


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path | None  # None: --json only


@dataclass
class Tally:
    done: int = 0
    skipped: int = 0
    failures: list[tuple[Path, int, str]] = field(default_factory=list)


def looks_like_folder_run(images: list[str], out: Path | None, json_path: Any) -> bool:
    """Folder mode when asked for an output folder or a JSONL file, or given many inputs."""
    if out is not None or isinstance(json_path, str) or len(images) != 1:
        return True
    one = images[0]
    return Path(one).is_dir() or (glob.has_magic(one) and not Path(one).exists())


# -- walking -----------------------------------------------------------------------------
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def expand(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(image, its path relative to the output folder) for every input, in a stable order."""
    found: list[tuple[Path, Path]] = []
    for text in inputs:
        if text.lower().startswith(("http://", "https://")):
            raise ClientError(
                f"{text}: folder mode takes local files, folders and globs, not URLs", EXIT_USAGE
            )
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if _is_image(p))
            found += [(p, p.relative_to(path)) for p in files]
        elif path.is_file():
            found.append((path, Path(path.name)))
        elif glob.has_magic(text):
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            found += [(p, Path(p.name)) for p in files if _is_image(p)]
        else:
            raise ClientError(f"{text}: no such file, folder or matching glob", EXIT_USAGE)
    if not found:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ClientError(f"no images ({kinds}) in {inputs}", EXIT_USAGE)
    return found


def plan(inputs: list[str], out: Path | None) -> list[Job]:
    jobs, seen = [], {}
    for source, rel in expand(inputs):
        output = out / rel.with_suffix(OUTPUT_SUFFIX) if out is not None else None
        key = output or source.resolve()
        if key in seen:
            if seen[key] == source.resolve():
                continue  # the same file named twice (a folder and a glob inside it)
            raise ClientError(
                f"{seen[key]} and {source} would both be written to {output}; "
                "rename one or run them separately",
                EXIT_USAGE,
            )
        seen[key] = source.resolve()
        jobs.append(Job(source, output))
    return jobs


def _done_in_jsonl(path: Path) -> set[str]:
    """Sources with a result line in an earlier run's JSONL (the resume record without --out)."""
    done: set[str] = set()
    if not path.exists():
        return done
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(row, dict) and "error" not in row and isinstance(row.get("source"), str):
            done.add(row["source"])
    return done


def batches(jobs: list[Job], size: int) -> list[list[Job]]:
    out: list[list[Job]] = []
    current: list[Job] = []
    total = 0
    for job in jobs:
        try:
            nbytes = job.source.stat().st_size
        except OSError:
            nbytes = 0
        if current and (len(current) >= size or total + nbytes > MAX_BATCH_BYTES):
            out.append(current)
            current, total = [], 0
        current.append(job)
        total += nbytes
    if current:
        out.append(current)
    return out


# -- progress ----------------------------------------------------------------------------
class RateBar:
    """done/total, images/s and ETA on stderr: redrawn on a terminal, a line per 10 % else."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.start = time.monotonic()
        self._step = -1
        self._width = 0

    def line(self, done: int, failed: int) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = done / elapsed
        left = (self.total - done) / rate if rate > 0 else None
        eta = "--:--" if left is None else _clock(left)
        pct = 100 * done // max(self.total, 1)
        fail = f", {failed} failed" if failed else ""
        return (
            f"{self.label}: {done}/{self.total} images ({pct}%) {rate:.1f} images/s, "
            f"ETA {eta}{fail}"
        )

    def update(self, done: int, failed: int) -> None:
        text = self.line(done, failed)
        if self.live:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            step = 10 * done // max(self.total, 1)
            if step == self._step and done != self.total:
                return
            self._step = step
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


# -- running -----------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    """Whole or absent: a kill between the two steps leaves a .part file, never a torn output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part")
    part.write_bytes(data)
    os.replace(part, path)


def _send(
    service: Service, model: str, group: list[Job], params: dict[str, Any], fmt: str
) -> list[dict[str, Any]]:
    files = []
    for job in group:
        try:
            files.append((job.source.name, job.source.read_bytes()))
        except OSError as err:
            raise ClientError(f"cannot read {job.source}: {err.strerror}", EXIT_LOCAL) from None
    try:
        return service.detect_batch(model, files, params, fmt)
    except ClientError as err:
        # Unreachable, or refused for what every batch shares (unknown model or parameter,
        # no key): the other batches would fail alike, so stop here with the reason.
        if err.status is None or (400 <= err.status < 500 and err.status != 413):
            raise
        # Too big or failed as a whole (413, 5xx): each of its images failed so; go on.
        return [{"error": "batch_failed", "detail": err.message, "status": err.status}] * len(group)


def run_folder(
    service: Service,
    model: str,
    inputs: list[str],
    *,
    out: Path | None,
    json_path: Path | None,
    params: dict[str, Any],
    overwrite: bool = False,
    batch_size: int = 16,
    in_flight: int = 2,
) -> int:
    if out is None and json_path is None:
        raise ClientError("folder mode needs --out DIR and/or --json FILE.jsonl", EXIT_USAGE)
    if batch_size < 1 or in_flight < 1:
        raise ClientError("--batch and --in-flight must be at least 1", EXIT_USAGE)
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ClientError(f"--out {out}: not a folder", EXIT_USAGE)
        out.mkdir(parents=True, exist_ok=True)
    jobs = plan(inputs, out)
    tally = Tally()
    if not overwrite:
        if out is not None:
            todo = [j for j in jobs if not (j.output and j.output.exists())]
        else:
            assert json_path is not None
            finished = _done_in_jsonl(json_path)
            todo = [j for j in jobs if str(j.source) not in finished]
        tally.skipped = len(jobs) - len(todo)
    else:
        todo = jobs
    kill_after = int(os.environ.get(KILL_AFTER_ENV) or 0)
    fmt = "base64" if out is not None else "json"
    bar = RateBar(model, len(todo))
    start = time.monotonic()
    jsonl = None
    if json_path is not None:
        jsonl = open(json_path, "w" if overwrite else "a", encoding="utf-8")  # noqa: SIM115
    try:
        with cf.ThreadPoolExecutor(in_flight) as pool:
            futures = {
                pool.submit(_send, service, model, group, params, fmt): group
                for group in batches(todo, batch_size)
            }
            bar.update(0, 0)
            try:
                for future in cf.as_completed(futures):
                    group = futures[future]
                    for job, result in zip(group, future.result(), strict=True):
                        _record(job, result, tally, jsonl)
                        if kill_after and tally.done >= kill_after:
                            os.kill(os.getpid(), signal.SIGKILL)
                    bar.update(tally.done + len(tally.failures), len(tally.failures))
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()
        if jsonl is not None:
            jsonl.close()
    return _summary(model, len(jobs), tally, time.monotonic() - start)


def _record(job: Job, result: dict[str, Any], tally: Tally, jsonl: TextIO | None) -> None:
    row = {k: v for k, v in result.items() if k not in ("image_base64", "index")}
    row = {"source": str(job.source), **row}
    if "error" in result:
        tally.failures.append((job.source, int(result.get("status") or 0), result["detail"]))
    else:
        if job.output is not None:
            try:
                _write_atomic(job.output, base64.b64decode(result["image_base64"]))
            except OSError as err:
                message = f"cannot write {job.output}: {err.strerror}"
                raise ClientError(message, EXIT_LOCAL) from None
            row["output"] = str(job.output)
        tally.done += 1
    if jsonl is not None:
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()


def _summary(model: str, total: int, tally: Tally, seconds: float) -> int:
    failed = len(tally.failures)
    rate = (tally.done + failed) / seconds if seconds > 0 else 0.0
    print(
        f"{model}: {total} images: {tally.done} done, {tally.skipped} skipped (output exists), "
        f"{failed} failed in {seconds:.1f} s ({rate:.1f} images/s)"
    )
    if not failed:
        return EXIT_OK
    for source, status, detail in tally.failures[:20]:
        print(f"  failed: {source}: {status} {detail}", file=sys.stderr)
    if failed > 20:
        print(f"  ... and {failed - 20} more (see --json for all)", file=sys.stderr)
    # 4 when every failure is the input's fault (4xx), 5 when the service failed on some.
    return EXIT_REJECTED if all(400 <= s < 500 for _, s, _ in tally.failures) else EXIT_FAILED

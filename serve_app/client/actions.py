"""What both CLI modes do: run a model on an image, save the picture, summarise the answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve_app.client.progress import ProgressBar
from serve_app.client.service import (
    EXIT_LOCAL,
    EXIT_USAGE,
    Answer,
    ClientError,
    ImageSource,
    Service,
)

FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
DEFAULT_FORMAT = {"detector": "jpeg", "segmenter": "png"}
EXTENSIONS = {"jpeg": ".jpg", "png": ".png"}
# Request keys that make a SAM request prompted (a direct call) rather than automatic (a job).
PROMPT_KEYS = ("points", "boxes")


def default_output(image: ImageSource, model: str, kind: str) -> Path:
    """`<image stem>-<model>.jpg|png` in the current folder, like the seed program's default."""
    return Path(f"{image.stem}-{model}{EXTENSIONS[DEFAULT_FORMAT[kind]]}")


def output_format(path: Path, kind: str) -> str:
    suffix = path.suffix.lower()
    if not suffix:
        return DEFAULT_FORMAT[kind]
    if suffix not in FORMATS:
        raise ClientError(f"{path}: the output must end in .jpg, .jpeg or .png", EXIT_USAGE)
    return FORMATS[suffix]


def with_extension(path: Path, kind: str) -> Path:
    """The path as given, or with the kind's default extension when it has none."""
    return path if path.suffix else path.with_suffix(EXTENSIONS[DEFAULT_FORMAT[kind]])


def run_model(
    service: Service,
    kind: str,
    model: str,
    image: ImageSource,
    params: dict[str, Any],
    fmt: str,
) -> Answer:
    """One answer in `fmt` (json, jpeg, png); automatic segmentation runs as a job."""
    if kind == "detector":
        return service.call("detect", model, image, params, fmt)
    if any(k in params for k in PROMPT_KEYS):
        return service.call("segment", model, image, params, fmt)
    bar = ProgressBar(model)
    try:
        return service.run_job(model, image, params, fmt, on_progress=bar.update)
    finally:
        bar.close()


def save(path: Path, answer: Answer) -> None:
    try:
        path.write_bytes(answer.content)
    except OSError as err:
        raise ClientError(f"cannot write {path}: {err.strerror}", EXIT_LOCAL) from None


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_lines(kind: str, data: dict[str, Any]) -> list[str]:
    """Human lines for a JSON answer: a headline, then one line per face or mask."""
    size = f"{data.get('width')}x{data.get('height')}"
    count = int(data.get("count", 0))
    if kind == "detector":
        lines = [f"{data.get('model')}: {plural(count, 'face')} found ({size} image)"]
        for i, f in enumerate(data.get("faces", []), 1):
            lines.append(
                f"  {i}. box x={f['x']} y={f['y']} w={f['w']} h={f['h']}  score {f['score']:.3f}"
            )
        return lines
    mode = data.get("mode", "")
    lines = [
        f"{data.get('model')}: {plural(count, 'mask')} ({mode}, {size} image)".replace("(, ", "(")
    ]
    for i, m in enumerate(data.get("masks", []), 1):
        x, y, w, h = m["bbox"]
        lines.append(
            f"  {i}. bbox x={x} y={y} w={w} h={h}  area {m['area']}  "
            f"iou {m['predicted_iou']:.3f}  stability {m['stability_score']:.3f}"
        )
    return lines


def saved_line(kind: str, path: Path, answer: Answer) -> str:
    what = "annotated image" if kind == "detector" else "mask overlay"
    found = ""
    if answer.count is not None:
        found = f" ({plural(answer.count, 'face' if kind == 'detector' else 'mask')})"
    return f"Saved the {what} to {path}{found}"

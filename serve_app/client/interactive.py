"""The seed's interactive program: which function, which image, which output file.

Plain `input()` prompts, so that a pseudo-terminal (or a pipe) can drive it. Wrong answers
are asked again rather than ending the session; only the service's own failures end it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from serve_app.client.actions import (
    default_output,
    output_format,
    run_model,
    save,
    saved_line,
    summary_lines,
    with_extension,
)
from serve_app.client.service import EXIT_OK, EXIT_USAGE, ClientError, ImageSource, Service

# Statuses that no request can change: picking such a model would only fail.
UNUSABLE = ("missing weights", "disabled")

Ask = Callable[[str], str]


def run_interactive(
    service: Service,
    params: dict[str, Any] | None = None,
    ask: Ask = input,
    out: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    models = service.models()
    print(f"visionserve at {service.url}", file=out)
    print("Functions:", file=out)
    for i, m in enumerate(models, 1):
        print(f"  {i}. {m['name']:<24} {m['kind']:<10} {m['status']}", file=out)
    model = _choose_model(models, ask, out)
    name, kind = model["name"], model["kind"]
    image = _ask_image(ask, out)
    path, fmt = _ask_output(image, name, kind, ask, out)
    params = params or {}

    if kind == "detector":
        # Boxes and scores come from the JSON answer, the picture from a second (cheap) call.
        data = run_model(service, kind, name, image, params, "json").data or {}
        picture = run_model(service, kind, name, image, params, fmt)
        lines = summary_lines(kind, data)
    else:
        # Automatic SAM is expensive: one job for the overlay, its mask count from X-Count.
        picture = run_model(service, kind, name, image, params, fmt)
        lines = []
    save(path, picture)
    for line in lines:
        print(line, file=out)
    print(saved_line(kind, path, picture), file=out)
    return EXIT_OK


def _prompt(ask: Ask, text: str) -> str:
    try:
        return ask(text).strip()
    except EOFError:
        raise ClientError("no answer (end of input); nothing was run", EXIT_USAGE) from None


def _choose_model(models: list[dict[str, Any]], ask: Ask, out: TextIO) -> dict[str, Any]:
    by_name = {m["name"]: m for m in models}
    while True:
        answer = _prompt(ask, f"Function (1-{len(models)} or name): ")
        if answer.isdigit() and 1 <= int(answer) <= len(models):
            model = models[int(answer) - 1]
        elif answer in by_name:
            model = by_name[answer]
        else:
            print(f"  no function {answer!r}: enter a number from the list or a name", file=out)
            continue
        if model["status"] in UNUSABLE:
            print(f"  {model['name']} is {model['status']}", file=out)
            if model.get("fetch_command"):
                print(f"  fetch its weights with: {model['fetch_command']}", file=out)
            continue
        return model


def _ask_image(ask: Ask, out: TextIO) -> ImageSource:
    while True:
        try:
            return ImageSource.parse(_prompt(ask, "Image URL or file path: "))
        except ClientError as err:
            if err.exit_code != EXIT_USAGE:
                raise
            print(f"  {err.message}", file=out)


def _ask_output(
    image: ImageSource, model: str, kind: str, ask: Ask, out: TextIO
) -> tuple[Path, str]:
    default = default_output(image, model, kind)
    while True:
        answer = _prompt(ask, f"Output file [{default}]: ")
        path = with_extension(Path(answer).expanduser(), kind) if answer else default
        try:
            fmt = output_format(path, kind)
        except ClientError as err:
            print(f"  {err.message}", file=out)
            continue
        if not path.parent.is_dir():
            print(f"  {path.parent} is not a folder", file=out)
            continue
        return path, fmt

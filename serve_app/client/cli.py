"""`visionserve`: call the service from a terminal, interactively or with flags.

visionserve                                   # interactive, like the seed's program
visionserve models
visionserve detect cnn-face-detection face.jpg -o boxes.jpg
visionserve detect face-detect-pigo https://example.com/face.jpg --json
visionserve detect yunet-face-detection crowd.jpg --param small_faces=true -o faces.jpg
visionserve detect yunet-face-detection crowd.jpg --param draw=blur -o blurred.jpg
visionserve detect face-detect-pigo photos/ --out boxed/ --json faces.jsonl   # folder mode
visionserve segment sam-mobile dog.jpg -o masks.png              # automatic, with progress
visionserve segment sam-mobile dog.jpg --points 120,80 --labels 1 -o dog-masks.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_app.client.actions import (
    DEFAULT_FORMAT,
    default_output,
    output_format,
    run_model,
    save,
    saved_line,
)
from serve_app.client.folder import looks_like_folder_run, run_folder
from serve_app.client.interactive import run_interactive
from serve_app.client.service import (
    DEFAULT_URL,
    EXIT_OK,
    EXIT_USAGE,
    ClientError,
    ImageSource,
    Service,
)

EXIT_CODES = """exit codes:
  0  done
  1  the local image could not be read or the output not written
  2  usage error (bad arguments, no such file)
  3  the service is unreachable (start it with `make run`)
  4  the service refused the request (4xx: unknown model, bad parameter, bad image, ...)
  5  the service failed or cannot serve the model now (5xx, 503 missing weights, timeout)
"""


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # The same options are accepted before and after the subcommand; the subcommand's copies
    # default to SUPPRESS so they don't overwrite values given before it.
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--url",
        default=default(os.environ.get("VISIONSERVE_URL") or DEFAULT_URL),
        help=f"the service's base URL (env VISIONSERVE_URL; default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=default(os.environ.get("VISIONSERVE_API_KEY")),
        help="sent as `Authorization: Bearer KEY` (env VISIONSERVE_API_KEY)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(600.0),
        metavar="SECONDS",
        help="longest wait for an answer or a job (default 600)",
    )


def _add_model_args(
    parser: argparse.ArgumentParser, output_help: str, *, many: bool = False
) -> None:
    parser.add_argument("model", help="model name (see `visionserve models`)")
    if many:
        parser.add_argument(
            "image",
            nargs="+",
            help="a local image file or an http(s) URL; or folders/globs (folder mode)",
        )
    else:
        parser.add_argument("image", help="a local image file or an http(s) URL")
    parser.add_argument("-o", "--output", type=Path, help=output_help)
    if many:
        parser.add_argument(
            "--json",
            nargs="?",
            const=True,
            default=False,
            metavar="FILE.jsonl",
            help="print the JSON answer on stdout; folder mode: append one line per image to FILE",
        )
    else:
        parser.add_argument("--json", action="store_true", help="print the JSON answer on stdout")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a model parameter, e.g. confidence=0.5 (repeatable)",
    )


def _add_folder_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "folder mode", "many images (folders, globs, several files) in batches, resumable"
    )
    g.add_argument("--out", type=Path, metavar="DIR", help="write <name>.jpg per image here")
    g.add_argument("--draw", choices=["box", "blur", "pixelate"], help="how faces are marked")
    g.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
    g.add_argument("--batch", type=int, default=16, metavar="N", help="images a request (16)")
    g.add_argument("--in-flight", type=int, default=2, metavar="N", help="requests at once (2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionserve",
        description="Face detection and Segment Anything from a visionserve service.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, top=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "interactive",
        parents=[common],
        help="ask for model, image and output (the default without a command)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a model parameter for the run (repeatable)",
    )

    p = sub.add_parser("models", parents=[common], help="list the models and their status")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")

    p = sub.add_parser("detect", parents=[common], help="find faces; save the boxed image")
    _add_model_args(
        p,
        "annotated image (.jpg or .png; `-` for stdout; default <image>-<model>.jpg unless --json)",
        many=True,
    )
    _add_folder_args(p)

    p = sub.add_parser(
        "segment",
        parents=[common],
        help="Segment Anything masks: prompted (points/boxes) or automatic (a job, with progress)",
    )
    _add_model_args(
        p, "overlay image (.png or .jpg; `-` for stdout; default <image>-<model>.png unless --json)"
    )
    p.add_argument(
        "--points", nargs="+", default=[], metavar="X,Y", help="prompt points in image pixels"
    )
    p.add_argument(
        "--labels",
        metavar="L,L,...",
        help="one label a point: 1 foreground, 0 background (default all 1)",
    )
    p.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="X0,Y0,X1,Y1",
        help="a prompt box (repeatable)",
    )
    return parser


# -- argument values ---------------------------------------------------------------------
def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`name=value` pairs; values that read as JSON (numbers, true/false) keep their type."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise ClientError(f"--param {pair!r}: expected NAME=VALUE", EXIT_USAGE)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[name.strip()] = value
    return params


def _numbers(text: str, count: int, flag: str) -> list[float | int]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise ClientError(f"{flag} {text!r}: expected {count} comma-separated numbers", EXIT_USAGE)
    return [int(v) if v.is_integer() else v for v in values]


def parse_prompts(points: list[str], labels: str | None, boxes: list[str]) -> dict[str, Any]:
    prompts: dict[str, Any] = {}
    if points:
        prompts["points"] = [_numbers(p, 2, "--points") for p in points]
        if labels is None:
            prompts["labels"] = [1] * len(points)
        else:
            values = labels.split(",")
            if len(values) != len(points) or any(v.strip() not in ("0", "1") for v in values):
                raise ClientError(
                    f"--labels {labels!r}: expected {len(points)} comma-separated 0/1 values, "
                    "one for each point",
                    EXIT_USAGE,
                )
            prompts["labels"] = [int(v) for v in values]
    elif labels is not None:
        raise ClientError("--labels needs --points", EXIT_USAGE)
    if boxes:
        prompts["boxes"] = [_numbers(b, 4, "--box") for b in boxes]
    return prompts


# -- commands ----------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace, service: Service) -> int:
    models = service.models()
    if args.json:
        print(json.dumps({"models": models}, indent=2))
        return EXIT_OK
    print(f"{'NAME':<24} {'KIND':<10} {'STATUS':<16} PARAMETERS")
    for m in models:
        params = ", ".join(m.get("parameters") or {}) or "-"
        print(f"{m['name']:<24} {m['kind']:<10} {m['status']:<16} {params}")
        if m.get("fetch_command"):
            print(f"{'':<24} fetch: {m['fetch_command']}")
    return EXIT_OK


def _run_flags(
    args: argparse.Namespace, service: Service, kind: str, prompts: dict[str, Any]
) -> int:
    image = ImageSource.parse(args.image)
    params = {**parse_params(args.param), **prompts}
    output: Path | None = args.output
    if output is None and not args.json:
        output = default_output(image, args.model, kind)
    to_stdout = output is not None and str(output) == "-"
    if to_stdout and args.json:
        raise ClientError("-o - and --json both want stdout; pick one", EXIT_USAGE)
    fmt = DEFAULT_FORMAT[kind]
    if output is not None and not to_stdout:
        fmt = output_format(output, kind)
        if not output.parent.is_dir():
            raise ClientError(f"{output}: folder {output.parent} does not exist", EXIT_USAGE)

    # --json and -o together are two calls: the API answers either data or a picture.
    if args.json:
        data = run_model(service, kind, args.model, image, params, "json").data
        print(json.dumps(data, indent=2))
    if output is not None:
        picture = run_model(service, kind, args.model, image, params, fmt)
        if to_stdout:
            sys.stdout.buffer.write(picture.content)
            sys.stdout.flush()
        else:
            save(output, picture)
            # stdout stays pure JSON with --json; the note goes to stderr then.
            print(saved_line(kind, output, picture), file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def cmd_detect(args: argparse.Namespace, service: Service) -> int:
    params = {"draw": args.draw} if args.draw else {}
    if looks_like_folder_run(args.image, args.out, args.json):
        if args.output is not None:
            raise ClientError("folder mode writes to --out DIR, not -o", EXIT_USAGE)
        return run_folder(
            service,
            args.model,
            args.image,
            out=args.out,
            json_path=Path(args.json) if isinstance(args.json, str) else None,
            params={**parse_params(args.param), **params},
            overwrite=args.overwrite,
            batch_size=args.batch,
            in_flight=args.in_flight,
        )
    args.image = args.image[0]
    return _run_flags(args, service, "detector", params)


def cmd_segment(args: argparse.Namespace, service: Service) -> int:
    prompts = parse_prompts(args.points, args.labels, args.box)
    return _run_flags(args, service, "segmenter", prompts)


def cmd_interactive(args: argparse.Namespace, service: Service) -> int:
    return run_interactive(service, parse_params(getattr(args, "param", [])))


COMMANDS: dict[str, Callable[[argparse.Namespace, Service], int]] = {
    "interactive": cmd_interactive,
    "models": cmd_models,
    "detect": cmd_detect,
    "segment": cmd_segment,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 itself on a usage error
    command = COMMANDS[args.command or "interactive"]
    try:
        with Service(args.url, api_key=args.api_key, timeout_s=args.timeout) as service:
            return command(args, service)
    except ClientError as err:
        print(f"visionserve: error: {err.message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\nvisionserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

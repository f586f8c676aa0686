"""`python -m serve_app.models list | fetch | verify`: manage the model weight files.

Exit codes: 0 success, 1 some file failed (each failure printed; the others still processed),
2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from serve_app.models import weights as w

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model-dir",
        metavar="DIR",
        help=f"where weight files live (default: ${w.MODEL_DIR_ENV}, else {w.model_dir()})",
    )
    parser = argparse.ArgumentParser(
        prog=w.CLI,
        description="List, fetch and verify the model weight files the service needs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", parents=[common], help="show every weight file and whether it is here")

    fetch = sub.add_parser(
        "fetch",
        parents=[common],
        help="download (or copy with --from) and verify weight files",
        description="Without NAME: the default set "
        f"({', '.join(w.DEFAULT_SET)}). Files already present are verified, not fetched again.",
    )
    fetch.add_argument("names", nargs="*", metavar="NAME")
    fetch.add_argument("--all", action="store_true", help="every registry entry (adds vit_l/h)")
    fetch.add_argument(
        "--config",
        metavar="SERVE_YAML",
        help="what the enabled models of this serve config need (e.g. config/serve.yaml)",
    )
    fetch.add_argument(
        "--from",
        dest="from_dir",
        metavar="DIR",
        help="install from files in DIR instead of downloading (offline)",
    )
    fetch.add_argument(
        "--skip-missing",
        action="store_true",
        help="with --from: skip files DIR does not have instead of failing",
    )
    fetch.add_argument(
        "--keep-going",
        action="store_true",
        help="report failures but exit 0, so a start script can fetch what it can and go on",
    )
    fetch.add_argument("--no-progress", action="store_true", help="no progress bars")

    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="check the sha256 of present weight files",
        description="Without NAME: every present file (missing ones are listed, not failures). "
        "A NAME that is missing is a failure.",
    )
    verify.add_argument("names", nargs="*", metavar="NAME")
    return parser


def _human(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _status(wf: w.WeightFile, directory: Path) -> str:
    found = w.find(wf, directory)
    if found is None:
        return "wrong size" if (directory / wf.filename).is_file() else "missing"
    if found.parent != directory:
        return f"present (bundled: {wf.bundled_in.split('/')[0]})" if wf.bundled_in else "present"
    return "present"


def _list(directory: Path) -> int:
    print(f"model dir: {directory}")
    rows = [("NAME", "FILE", "SIZE", "STATUS", "USED BY")]
    for wf in w.REGISTRY.values():
        default = "" if wf.name in w.DEFAULT_SET else " (--all)"
        rows.append(
            (
                wf.name + default,
                wf.filename,
                _human(wf.size),
                _status(wf, directory),
                ", ".join(wf.used_by),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(n) for c, n in zip(row, widths, strict=False)) + "  " + row[-1])
    return EXIT_OK


def _fetch(args: argparse.Namespace, directory: Path) -> int:
    if args.skip_missing and not args.from_dir:
        print("error: --skip-missing only applies with --from DIR", file=sys.stderr)
        return EXIT_USAGE
    if args.from_dir and not Path(args.from_dir).is_dir():
        print(f"error: --from {args.from_dir}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    if sum(map(bool, (args.all, args.names, args.config))) > 1:
        print("error: give one of NAMEs, --all or --config", file=sys.stderr)
        return EXIT_USAGE
    if args.config:
        # Imported here: config checks need pydantic and yaml, which plain fetching does not.
        from serve_app.config import load_config, weights_needed

        names = weights_needed(load_config(args.config))
    else:
        names = list(w.REGISTRY) if args.all else (args.names or list(w.DEFAULT_SET))
    try:
        done = w.fetch(
            names,
            model_dir=directory,
            from_dir=args.from_dir,
            progress=not args.no_progress,
            skip_missing=args.skip_missing,
        )
    except w.UnknownWeightError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except w.FetchError as err:
        for name, path in err.fetched.items():
            print(f"ok      {name}: {path}")
        for failure in err.failures.values():
            print(f"FAILED  {failure}", file=sys.stderr)
        if args.keep_going:
            print(f"{len(err.failures)} file(s) not fetched; continuing (--keep-going)")
            return EXIT_OK
        return EXIT_FAILED
    for name, path in done.items():
        print(f"ok      {name}: {path}")
    return EXIT_OK


def _verify(args: argparse.Namespace, directory: Path) -> int:
    try:
        wfs = [w.resolve(n) for n in args.names] or list(w.REGISTRY.values())
    except w.UnknownWeightError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    failed = 0
    for wf in wfs:
        path = w.find(wf, directory)
        if path is None and (directory / wf.filename).is_file():
            path = directory / wf.filename  # wrong size: let verify() say so
        if path is None:
            print(f"missing {wf.name}: run `{w.fetch_command(wf.name)}`")
            failed += bool(args.names)
            continue
        try:
            w.verify(path, wf)
        except w.VerificationError as err:
            print(f"FAILED  {err}", file=sys.stderr)
            failed += 1
        else:
            print(f"ok      {wf.name}: {path}")
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits 2 on usage errors
    # Only our own messages: httpx logs every request at INFO.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("serve_app.models")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    directory = w.model_dir(args.model_dir)
    if args.command == "list":
        return _list(directory)
    if args.command == "fetch":
        return _fetch(args, directory)
    return _verify(args, directory)


if __name__ == "__main__":
    raise SystemExit(main())

"""`make bench`: every benchmark in turn, each printing progress and writing bench/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = [
    ("detectors: in-process vs HTTP", [sys.executable, "-m", "bench.detectors"]),
    ("Pico vs Haar on truck.jpg", [sys.executable, "bench/pico_vs_haar.py"]),
    (
        "face detectors' accuracy on faces-dev (own service)",
        [sys.executable, "-m", "bench.accuracy", "--model", "all", "--serve"],
    ),
    (
        "SAM: fast vs reference generator, memory, prompt cache",
        [sys.executable, "bench/sam_bench.py", *sys.argv[1:]],
    ),
]


def main() -> int:
    failed = []
    for i, (title, cmd) in enumerate(BENCHES, 1):
        print(f"\n=== [{i}/{len(BENCHES)}] {title}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(title)
    if failed:
        print(f"\nfailed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

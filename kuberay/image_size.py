"""Estimate the image's installed size from its lock files (no Docker needed).

    python -m kuberay.image_size [--lock kuberay/requirements.lock]

For each package the lock pins, the installed size of the same version in this environment
(the files its RECORD lists), so the estimate follows the lock. torch/torchvision come from
kuberay/torch-cpu.lock (the CPU wheels, not installable here): estimated as this
environment's torch minus its CUDA-only libraries, which the CPU build lacks. A package of the
lock missing here, or at another version, is reported and not counted.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "kuberay" / "requirements.lock"
BASE_IMAGE_MB = 130  # python:3.11-slim unpacked (~125-130 MB; Docker Hub lists ~45 MB packed)
APT_MB = 5  # wget and its libraries
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;\\]+)", re.M)
_CUDA_ONLY = re.compile(r"cuda|cudnn|nccl|cublas|cusparse|cufft|curand|nvrtc|triton", re.I)


def pins(path: Path) -> dict[str, str]:
    return {name.lower().replace("_", "-"): ver for name, ver in _PIN.findall(path.read_text())}


def installed_bytes(name: str, *, cpu_only: bool = False) -> int:
    dist = md.distribution(name)
    total = 0
    for f in dist.files or []:
        if cpu_only and _CUDA_ONLY.search(f.name):
            continue
        try:
            total += Path(f.locate()).stat().st_size
        except OSError:
            pass
    return total


def estimate(lock: Path) -> dict[str, object]:
    sizes: dict[str, int] = {}
    problems: list[str] = []
    for name, version in pins(lock).items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name}=={version}: not installed here")
            continue
        if have != version:
            problems.append(f"{name}=={version}: {have} installed here")
            continue
        sizes[name] = installed_bytes(name)
    torch = {n: installed_bytes(n, cpu_only=True) for n in ("torch", "torchvision")}
    mb = 1e6
    packages = sum(sizes.values())
    total = packages + sum(torch.values()) + (BASE_IMAGE_MB + APT_MB) * mb
    return {
        "lock": str(lock.relative_to(REPO)),
        "packages": len(sizes),
        "packages_mb": round(packages / mb),
        "torch_cpu_estimate_mb": {k: round(v / mb) for k, v in torch.items()},
        "base_and_apt_mb": BASE_IMAGE_MB + APT_MB,
        "total_mb": round(total / mb),
        "largest_mb": {
            k: round(v / mb) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:8]
        },
        "not_counted": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kuberay.image_size")
    parser.add_argument("--lock", type=Path, default=LOCK)
    args = parser.parse_args(argv)
    import json

    print(json.dumps(estimate(args.lock.resolve()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which floating-point type the SAM image encoder runs in: float32 or bfloat16.

The encoder is nearly all of a prompted request and the largest single stage of automatic
masks. Under bfloat16 autocast it runs ~2-4x faster on CPUs with native bf16 arithmetic
(x86 AVX512-BF16 or AMX-BF16, Arm's BF16 extension; on NVIDIA GPUs from Ampere on), and
slower than float32 where bf16 is emulated (most AVX2 laptops). So `auto` picks bf16 only
when the hardware says it has it, optionally confirmed by a one-off timing probe.

Only the encoder changes: its output embedding is cast back to float32, and the decoder and
mask post-processing stay float32 (masks are thresholded logits; their fidelity under bf16
is measured in bench/sam_bench.py, not assumed).

Every input of the decision is injectable (CPU flags, machine name, probe) so tests force
both branches on any machine.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# /proc/cpuinfo flags that mean bf16 arithmetic in hardware (x86 and Linux aarch64).
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ARM_BF16_FLAGS = frozenset({"bf16"})


@dataclass(frozen=True)
class Decision:
    dtype: torch.dtype
    reason: str  # one line, for the log and /v1/models

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """CPU feature flags: Linux /proc/cpuinfo `flags` (x86) or `Features` (Arm) lines; on
    macOS the `hw.optional.arm.FEAT_BF16` sysctl as the flag `bf16`. Empty if unknown."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        return frozenset({"bf16"}) if out == "1" else frozenset()
    return frozenset()


def native_bf16(
    device: torch.device,
    flags: Iterable[str] | None = None,
    machine: str | None = None,
) -> tuple[bool, str]:
    """(whether `device` runs bf16 natively, why). `flags`/`machine` default to this host's."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"cuda bf16 {'supported' if ok else 'not supported'}"
    if device.type != "cpu":
        return False, f"no bf16 check for device {device.type}"
    flags = cpu_flags() if flags is None else frozenset(flags)
    machine = (machine or platform.machine()).lower()
    wanted = ARM_BF16_FLAGS if machine in ("aarch64", "arm64") else X86_BF16_FLAGS
    found = sorted(wanted & flags)
    if found:
        return True, f"cpu flags {','.join(found)}"
    return False, f"no native bf16 ({machine}: none of {','.join(sorted(wanted))})"


def probe_speedup(device: torch.device, size: int = 768, reps: int = 3) -> float:
    """float32 time / bf16 time of a size^3 matrix product, best of `reps` each (~0.1 s on
    a 2-core CPU). A one-off check that the flags are not lying (e.g. a VM that reports
    them but traps the instructions)."""

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        times = []
        for _ in range(reps + 1):  # first run warms up the kernel
            t = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times[1:])

    return best(torch.float32) / best(torch.bfloat16)


def choose(
    option: str,
    device: torch.device,
    flags: Iterable[str] | None = None,
    machine: str | None = None,
    probe: Callable[[torch.device], float] | None = None,
) -> Decision:
    """The encoder dtype for `option` ("auto", "float32", "bfloat16") on `device`.

    `auto`: bf16 where `native_bf16` says so and, if a `probe` is given, where it measured
    bf16 at least 1.2x faster than float32; else float32. An explicit dtype is honoured
    as is (bfloat16 on a CPU without it runs, slowly: the operator asked for it).
    """
    if option not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {option!r}")
    if option != "auto":
        return Decision(TORCH_DTYPES[option], f"configured {option}")
    native, why = native_bf16(device, flags, machine)
    if not native:
        return Decision(torch.float32, f"auto: {why}")
    if probe is not None:
        speedup = probe(device)
        if speedup < 1.2:
            return Decision(torch.float32, f"auto: {why}, but bf16 probe {speedup:.2f}x")
        why += f", bf16 probe {speedup:.2f}x"
    return Decision(torch.bfloat16, f"auto: {why}")


def log_decision(model: str, decision: Decision) -> None:
    log.info("%s: SAM encoder dtype %s (%s)", model, decision.name, decision.reason)

"""A progress bar on stderr for jobs: redrawn in place on a terminal, sparse lines otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

WIDTH = 30


class ProgressBar:
    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        # Logs and CI capture want whole lines, not carriage-return animation.
        self.live = self.stream.isatty()
        self._last: tuple[int, str] | None = None
        self._width = 0

    def update(self, fraction: float, stage: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        percent = int(fraction * 100)
        if self.live:
            filled = int(fraction * WIDTH)
            line = f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {percent:3d}% {stage}"
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            # A line per stage change or per 10 %: enough to follow, not a flood.
            step = (percent // 10, stage)
            if step == self._last:
                return
            self._last = step
            self.stream.write(f"{self.label}: {percent:3d}% {stage}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

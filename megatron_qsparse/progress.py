"""Progress of a long step, the same in every command: a live bar with a total and an ETA on a terminal, and
one plain line every few percent (or every half minute) when the output is a log file or a pipe.

    with progress(total=len(files), desc="tokenizing", unit="doc") as bar:
        for f in files:
            ...
            bar.update(1)

Output goes to stderr, so it never mixes with a command's results on stdout. ``disable=True`` silences it.
"""

import sys
import time
from typing import IO, Optional

LINE_EVERY_PERCENT = 5
LINE_EVERY_SECONDS = 30.0


def progress(total: Optional[float] = None, desc: str = "", unit: str = "it", disable: bool = False, stream=None):
    """A bar (tqdm) on a terminal, :class:`LineProgress` elsewhere; both have ``update(n)``, ``set_postfix_str``
    and work as context managers."""
    stream = stream or sys.stderr
    if not disable and _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, mininterval=0.5, dynamic_ncols=True)
    return LineProgress(total, desc, unit, disable, stream)


def _is_terminal(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """``desc: 35% 350/1000 doc, 41.2 doc/s, 15s elapsed, ETA 16s``: a line at each LINE_EVERY_PERCENT step of
    the total (or every LINE_EVERY_SECONDS without a total, or when the total is far off), and one at the end."""

    def __init__(self, total, desc, unit, disable, stream, clock=time.monotonic):
        self.total, self.desc, self.unit, self.disable, self.stream = total, desc, unit, disable, stream
        self.clock = clock
        self.n = 0
        self.postfix = ""
        self.started = self.last_time = clock()
        self.last_percent = 0

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self.clock()
        percent = int(100 * self.n / self.total) if self.total else None
        due_percent = percent is not None and percent >= self.last_percent + LINE_EVERY_PERCENT
        if due_percent or now - self.last_time >= LINE_EVERY_SECONDS:
            self._line(now)
            self.last_time = now
            if percent is not None:
                self.last_percent = percent - percent % LINE_EVERY_PERCENT

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self.disable:
            self._line(self.clock(), final=True)
        self.disable = True

    def __enter__(self):
        return self

    def abandon(self) -> None:
        """Stop without the closing line: a failed or stopped step is not done (its error says what happened)."""
        self.disable = True

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abandon()
        self.close()
        return False

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.n / elapsed
        parts = [f"{self.desc}:" if self.desc else ""]
        if self.total:
            parts.append(f"{100 * self.n / self.total:.0f}% {_count(self.n)}/{_count(self.total)} {self.unit}")
        else:
            parts.append(f"{_count(self.n)} {self.unit}")
        parts[-1] += f", {rate:,.1f} {self.unit}/s, {_duration(elapsed)} elapsed"
        if self.total and not final and rate > 0 and self.n < self.total:
            parts[-1] += f", ETA {_duration((self.total - self.n) / rate)}"
        if final:
            parts[-1] += ", done"
        if self.postfix:
            parts[-1] += f" ({self.postfix})"
        print(" ".join(p for p in parts if p), file=self.stream, flush=True)


def _count(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"

"""Progress of long work: a tqdm bar on a terminal, plain periodic lines anywhere else.

A bar is the right thing on a terminal and the wrong one in a job log (SLURM,
CI, ``2> log``), where it turns into thousands of carriage returns. So
:func:`bar` gives a tqdm bar when stderr is a terminal, and otherwise a
:class:`Lines` object with the same ``update``/``set_postfix``/``close``
methods that prints one line every :data:`INTERVAL` seconds (and one at the
end): ``qrobust: score: 1200/9600 img (12%), 41.3 img/s, about 3m23s left``.
"""
from __future__ import annotations

import os
import sys
import time

INTERVAL = float(os.environ.get("QROBUST_PROGRESS_INTERVAL", "30"))  # seconds between plain lines


def bar(total: int, desc: str, unit: str, *, enabled: bool = True, initial: int = 0, **tqdm_options):
    """A progress bar for ``total`` units: tqdm on a terminal, :class:`Lines` otherwise, silent if not
    ``enabled``."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                    **tqdm_options)
    return Lines(total, desc, unit, initial)


class Lines:
    """tqdm's interface for a log: a line every :data:`INTERVAL` seconds and at the end."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.start_n, self.postfix = initial, ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= INTERVAL:
            self.last = now
            self._print(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _print(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        parts = [f"{self.n}/{self.total} {self.unit}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts.append(f"{rate:.3g} {self.unit}/s")
        if rate > 0 and self.total and self.n < self.total:
            parts.append(f"about {_duration((self.total - self.n) / rate)} left")
        elif self.n >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        print(f"qrobust: {self.desc}: " + ", ".join(parts), file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"

"""Progress bars that keep batch logs short.

`progress_bar` gives a tqdm bar when stderr is a terminal. When it is not (CI, ``> log.txt``), a
tqdm bar would write a new record at every update; instead `LineProgress` prints one plain line
(``desc: n/total [elapsed, postfix]``) at most every ``NOISYOPS_PROGRESS_INTERVAL`` seconds
(default 10) and one at the end. ``NOISYOPS_PROGRESS=tty`` forces the tqdm bar, ``=lines`` the
line printer, ``=off`` silences both.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional

__all__ = ["progress_bar", "progress_iter", "LineProgress", "progress_mode"]


def progress_mode(stream=None) -> str:
    """``"tty"``, ``"lines"`` or ``"off"``: ``$NOISYOPS_PROGRESS`` if set, else ``"tty"`` when
    ``stream`` (default stderr) is a terminal and ``"lines"`` otherwise."""
    env = os.environ.get("NOISYOPS_PROGRESS", "").strip().lower()
    if env:
        if env not in ("tty", "lines", "off"):
            raise ValueError(f"NOISYOPS_PROGRESS={env!r}: expected 'tty', 'lines' or 'off'")
        return env
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "tty" if (isatty is not None and isatty()) else "lines"


class LineProgress:
    """The subset of tqdm's interface the project uses (``update``, ``set_postfix``, ``close``,
    iteration), printing a line at most every ``interval`` seconds and at ``close``."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", interval: Optional[float] = None, file=None, **_ignored):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        env = os.environ.get("NOISYOPS_PROGRESS_INTERVAL")
        self.interval = float(env) if (interval is None and env) else (10.0 if interval is None else interval)
        self.file = sys.stderr if file is None else file
        self.t0 = self.last = time.perf_counter()
        self.postfix = ""
        self.closed = False

    def _line(self) -> str:
        tot = "" if self.total is None else f"/{self.total}"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.n}{tot} {self.unit} [{time.perf_counter() - self.t0:.0f} s{extra}]"

    def _emit(self):
        print(self._line(), file=self.file, flush=True)
        self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.interval:
            self._emit()

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()


class _Off(LineProgress):
    def _emit(self):
        pass


def progress_bar(total: Optional[int] = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
                 iterable: Optional[Iterable] = None, **tqdm_kwargs):
    """A tqdm bar on a terminal, a `LineProgress` otherwise (see module docstring); with
    ``enabled=False`` an object with the same methods that prints nothing."""
    mode = progress_mode() if enabled else "off"
    if mode == "tty":
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, **tqdm_kwargs)
    cls = LineProgress if mode == "lines" else _Off
    return cls(iterable, total=total, desc=desc, unit=unit)


def progress_iter(iterable: Iterable, desc: str = "", unit: str = "it", *, enabled: bool = True, **kw):
    """``progress_bar(iterable=iterable, ...)``: iterate with progress reporting."""
    return progress_bar(desc=desc, unit=unit, enabled=enabled, iterable=iterable, **kw)

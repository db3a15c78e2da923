"""A tiny progress bar for long CLI work (tiles, images, training steps, benchmark cases).

``Progress(total, desc)`` writes ``desc  [#####.....] 12/40  30%  3.1 s/it  ETA 1m27s`` to a
stream (stderr by default), redrawn in place with ``\\r``.  It is silent when the stream is
not a TTY (logs, pipes, tests) unless ``enabled=True`` is passed, and it redraws at most every
``min_interval`` seconds so that it costs nothing measurable.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``3.2`` -> ``'3s'``, ``95`` -> ``'1m35s'``, ``4000`` -> ``'1h06m'``."""
    if seconds != seconds or seconds < 0:  # NaN or negative: unknown
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Progress bar over ``total`` units of work.

    Args:
        total: number of units (``> 0``; ``None`` or 0 shows a counter without bar/ETA).
        desc: short label printed before the bar.
        stream: where to write (default ``sys.stderr``).
        enabled: force on/off; ``None`` (default) means "only if ``stream`` is a TTY".
        width: bar width in characters.
        min_interval: least seconds between two redraws (the last update always draws).

    Use as ``p = Progress(n, "tiles"); ...; p.update(); ...; p.close()`` or as a context
    manager.  ``close()`` ends the line; it is safe to call more than once.
    """

    def __init__(self, total, desc: str = "", stream=None, enabled=None, width: int = 24,
                 min_interval: float = 0.2):
        if total is not None and (not isinstance(total, int) or isinstance(total, bool)
                                  or total < 0):
            raise ValueError(f"Progress: total must be a non-negative int or None, got {total!r}")
        self.total = total or None
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            try:
                enabled = bool(isatty()) if callable(isatty) else False
            except (OSError, ValueError):
                enabled = False
        self.enabled = enabled
        self.width = width
        self.min_interval = min_interval
        self.n = 0
        self.postfix = ""
        self._start = time.monotonic()
        self._last_draw = -1e9
        self._closed = False
        self._drawn = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def set_postfix(self, text: str) -> None:
        """Short text shown after the ETA (e.g. ``'loss 0.123'``); redrawn on the next update."""
        self.postfix = str(text)

    def line(self) -> str:
        """The current progress line (without ``\\r``)."""
        elapsed = time.monotonic() - self._start
        head = f"{self.desc}  " if self.desc else ""
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = int(round(frac * self.width))
            bar = "#" * filled + "." * (self.width - filled)
            text = f"{head}[{bar}] {self.n}/{self.total} {frac * 100:3.0f}%"
        else:
            text = f"{head}{self.n}"
        if self.n > 0:
            per = elapsed / self.n
            rate = f"{per:.2f} s/it" if per >= 1.0 or per == 0 else f"{1.0 / per:.1f} it/s"
            text += f"  {rate}"
            if self.total and self.n < self.total:
                text += f"  ETA {format_seconds(per * (self.total - self.n))}"
            else:
                text += f"  {format_seconds(elapsed)}"
        if self.postfix:
            text += f"  {self.postfix}"
        return text

    def _draw(self, force: bool = False) -> None:
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        try:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False
            return
        self._drawn = True

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done and redraw (rate-limited)."""
        self.n += n
        self._draw(force=self.total is not None and self.n >= self.total)

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self._closed:
            return
        if self.enabled:
            self._draw(force=True)
            if self._drawn:
                try:
                    self.stream.write("\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass
        self._closed = True

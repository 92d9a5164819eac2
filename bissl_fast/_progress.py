"""Progress reporting that works on the core install: a tqdm bar when tqdm is installed, plain lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class PlainProgress:
    """A tqdm-like counter that prints one line to ``stream`` at most every ``interval_s`` seconds (and at the end).

    ``initial`` is work already done (a resumed run): the count starts there.
    """

    def __init__(self, total: int, desc: str, stream: TextIO | None = None, interval_s: float = 10.0,
                 initial: int = 0) -> None:
        self.total, self.desc, self.interval_s = total, desc, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = initial
        self.postfix: dict[str, Any] = {}
        self._last_print = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self._last_print >= self.interval_s:
            self._last_print = now
            extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.done}/{self.total} {extra}".rstrip(), file=self.stream, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        pass


def progress_bar(
    total: int, desc: str, requested: bool | None, *, initial: int = 0, unit: str = "step", note: bool = True
) -> Any:
    """A tqdm bar, a :class:`PlainProgress`, or ``None`` (no reporting), counting ``unit`` from ``initial`` to ``total``.

    ``requested`` is the user's choice: ``False`` -> ``None``; ``None`` (automatic) -> tqdm when
    installed, else ``None``; ``True`` -> tqdm when installed, else plain lines and (with ``note``;
    a caller making many bars says it once) a one-line note that the ``demo`` extra provides the bar.
    """
    if requested is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if requested is None:
            return None
        if note:
            print("progress: tqdm is not installed (pip install 'bissl_fast[demo]' for a bar); printing plain lines",
                  file=sys.stderr)
        return PlainProgress(total, desc, initial=initial)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial)


__all__ = ["PlainProgress", "progress_bar"]

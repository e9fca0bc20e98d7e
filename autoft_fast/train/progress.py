"""A dependency-free progress bar (loss and samples/s) and the run's file logger."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TextIO

__all__ = ["ProgressBar", "setup_logging", "LOGGER_NAME"]

LOGGER_NAME = "autoft_fast"


class ProgressBar:
    """One-line progress display redrawn at most every `min_interval` seconds.

    It draws only when `stream` is a terminal (or `enabled=True` forces it), so logs and
    pipes stay clean.

    Example:
        >>> bar = ProgressBar(total=100, desc="epoch 1")
        >>> bar.update(10, loss=0.52)   # 10 more samples done
        >>> bar.close()
    """

    def __init__(self, total: int, desc: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None, min_interval: float = 0.2):
        self.total = int(total)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stdout
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.min_interval = min_interval
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self.postfix: dict = {}

    def update(self, n: int, **postfix) -> None:
        self.done += int(n)
        self.postfix.update(postfix)
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last_draw >= self.min_interval or self.done >= self.total:
            self._last_draw = now
            self._draw(now)

    def rate(self) -> float:
        """Samples per second since the bar was created."""
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        width = 24
        filled = int(round(width * min(frac, 1.0)))
        bar = "#" * filled + "-" * (width - filled)
        extras = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in self.postfix.items())
        line = (f"\r{self.desc} [{bar}] {self.done}/{self.total} "
                f"{self.rate():,.0f} samples/s {extras}")
        self.stream.write(line[:160].ljust(80))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


def _own_debug_only(record: logging.LogRecord) -> bool:
    # Library modules below (the op's per-call backend choice, say) log at DEBUG on every
    # forward; a run log keeps their INFO and above and the trainer's own DEBUG epoch lines.
    return record.levelno >= logging.INFO or record.name in (LOGGER_NAME, LOGGER_NAME + ".train")


def setup_logging(log_file: Path | None, verbose: bool = False,
                  console: bool = True) -> logging.Logger:
    """Configure the `autoft_fast` logger: the trainer's DEBUG epoch lines and every module's
    INFO and above into `log_file`, and INFO (DEBUG with `verbose`) to stderr. Calling it again replaces the previous handlers, so
    each run directory gets its own log.

    Example:
        >>> log = setup_logging(Path("/tmp/run/log.txt"))
        >>> log.info("pretraining on %d rows", 1000)
    """
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    if log_file is not None:
        log_file = Path(log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        fh.addFilter(_own_debug_only)
        logger.addHandler(fh)
    if console:
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(logging.DEBUG if verbose else logging.INFO)
        sh.setFormatter(logging.Formatter("%(message)s"))
        sh.addFilter(_own_debug_only)
        logger.addHandler(sh)
    return logger

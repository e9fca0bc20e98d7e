"""The training progress bar (tqdm: loss, samples/s, the validation metric at each epoch's
end) and the run's file logger."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

__all__ = ["ProgressBar", "setup_logging", "log_to_file", "LOGGER_NAME"]

LOGGER_NAME = "autoft_fast"


class ProgressBar:
    """One epoch's progress line, drawn by tqdm at most every `min_interval` seconds.

    It draws only when `stream` is a terminal (or `enabled=True` forces it), so logs and
    pipes stay clean. tqdm pads each redraw to the previous line's length, so a shorter
    line leaves no stale characters. The samples/s shown stop counting when the last sample
    is done, so evaluating before `close` does not lower them; `close(**metrics)` puts the
    epoch's validation metric on the final line.

    Example:
        >>> bar = ProgressBar(total=100, desc="epoch 1")
        >>> bar.update(100, loss=0.52)   # 100 more samples done
        >>> bar.close(valid_auc=0.7312)
    """

    def __init__(self, total: int, desc: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None, min_interval: float = 0.2):
        from tqdm import tqdm

        self.total = int(total)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stdout
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        self._end: float | None = None
        self.postfix: dict = {}
        self._bar = None
        if enabled:
            self._bar = tqdm(total=self.total, desc=desc, file=self.stream, leave=True,
                             mininterval=min_interval, miniters=1, ncols=None,
                             bar_format="{desc} {percentage:3.0f}%|{bar:24}| "
                                        "{n_fmt}/{total_fmt} [{elapsed}] {postfix}")

    def update(self, n: int, **postfix) -> None:
        """`n` more samples done; `postfix` (name=value) is shown after the bar."""
        self.done += int(n)
        if self.done >= self.total and self._end is None:
            self._end = time.perf_counter()
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix_text(), refresh=False)
            self._bar.update(int(n))

    def rate(self) -> float:
        """Samples per second from the bar's creation to the last sample (or to now)."""
        elapsed = (self._end or time.perf_counter()) - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _postfix_text(self) -> str:
        extras = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in self.postfix.items())
        return f"{self.rate():,.0f} samples/s {extras}".rstrip()

    def close(self, **postfix) -> None:
        """Draw the final line (with `postfix`, e.g. the validation metric) and end it."""
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix_text(), refresh=False)
            self._bar.close()
            self._bar = None


def _own_debug_only(record: logging.LogRecord) -> bool:
    # Library modules below (the op's per-call backend choice, say) log at DEBUG on every
    # forward; a run log keeps their INFO and above and the trainer's own DEBUG epoch lines.
    return record.levelno >= logging.INFO or record.name in (LOGGER_NAME, LOGGER_NAME + ".train")


def setup_logging(log_file: Path | None, verbose: bool = False,
                  console: bool = True) -> logging.Logger:
    """Configure the `autoft_fast` logger: the trainer's DEBUG epoch lines and every module's
    INFO and above into `log_file`, and INFO (DEBUG with `verbose`) to stderr. Calling it again replaces the previous handlers, so
    each run directory gets its own log.

    Without `log_file`, the INFO records logged until the next call with one are kept and
    then written at the start of that file (a command that loads its data before it makes
    its run folder still logs everything there).

    Example:
        >>> log = setup_logging(Path("/tmp/run/log.txt"))
        >>> log.info("pretraining on %d rows", 1000)
    """
    logger = logging.getLogger(LOGGER_NAME)
    early: list[logging.LogRecord] = []
    for h in list(logger.handlers):
        if isinstance(h, _EarlyRecords) and log_file is not None:
            early = h.records
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
        for record in early:  # what was logged before the run had a folder
            fh.handle(record)
        logger.addHandler(fh)
    else:
        logger.addHandler(_EarlyRecords(early))
    if console:
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(logging.DEBUG if verbose else logging.INFO)
        sh.setFormatter(_ConsoleFormatter())
        sh.addFilter(_own_debug_only)
        logger.addHandler(sh)
    return logger


class _ConsoleFormatter(logging.Formatter):
    """The message; a warning or an error with the command's prefix, as the CLI prints its
    own (``autoft-fast: warning: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"autoft-fast: error: {text}"
        if record.levelno >= logging.WARNING:
            return f"autoft-fast: warning: {text}"
        return text


class _EarlyRecords(logging.Handler):
    """Keeps the INFO-and-above records logged before a run has its log file (data loading,
    a damaged cache), so that :func:`setup_logging` with the file writes them there first."""

    LIMIT = 10_000

    def __init__(self, records: list[logging.LogRecord]):
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(record)


def log_to_file(level: int, msg: str, *args, exc_info=None) -> None:
    """Write a record to the run's log file only (not the terminal): the error of a failed
    run goes to its log.txt while the terminal gets the one-line message.

    Example:
        >>> log_to_file(logging.ERROR, "run failed: %s", "disk full")
    """
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    logger = logging.getLogger(LOGGER_NAME)
    record = logger.makeRecord(LOGGER_NAME, level, __file__, 0, msg, args, exc_info)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


# More threads than this many per core only add waiting (and at some point no thread can be
# started at all).
MAX_THREADS_PER_CORE = 8


def check_threads(threads: int, option: str) -> int:
    """``threads`` if it is a usable thread count, else a ValueError naming ``option``.

    Example::

        >>> check_threads(2, "--threads")
        2
    """
    cores = os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"{option} must be >= 1, got {threads}")
    if threads > MAX_THREADS_PER_CORE * cores:
        raise ValueError(f"{option} = {threads} is more than {MAX_THREADS_PER_CORE} threads per "
                         f"core on this machine ({cores} cores); give at most "
                         f"{MAX_THREADS_PER_CORE * cores}")
    return threads

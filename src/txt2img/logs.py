"""Logging and progress bars.

Every module logs to a child of the ``txt2img`` logger (``txt2img.pipeline``, ``txt2img.modeling``, ...), so
one level controls them all: ``txt2img.set_verbosity("info")``. Progress bars (loading a pipeline, each
pipeline call) are tqdm bars on stderr, off when any of these says so: the environment variable
``TXT2IMG_DISABLE_PROGRESS_BAR=1``, :func:`disable_progress_bars`, or, for one pipeline's calls,
``pipe.set_progress_bar_config(disable=True)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm.auto import tqdm

LOGGER_NAME = "txt2img"
PROGRESS_ENV = "TXT2IMG_DISABLE_PROGRESS_BAR"
_TRUE = {"1", "true", "yes", "on"}

_progress_bars_enabled = True


def set_verbosity(level: int | str) -> None:
    """Set the level of the ``txt2img`` logger, and of every module's logger below it.

    If logging is not configured yet (neither the ``txt2img`` logger nor the root logger has a handler), a
    handler writing to stderr is added, so that the messages of the new level are shown.

    Args:
        level: A ``logging`` level (``logging.INFO``, ``20``) or its name, in any case (``"info"``,
            ``"WARNING"``, ``"debug"``, ``"error"``, ``"critical"``).

    Raises:
        ValueError: an unknown level name, or a number that is not a level.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(_level_number(level))
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        logger.addHandler(handler)


def get_verbosity() -> int:
    """The effective level of the ``txt2img`` logger, as a number (``logging.WARNING`` is 30)."""
    return logging.getLogger(LOGGER_NAME).getEffectiveLevel()


def _level_number(level: int | str) -> int:
    names = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if isinstance(level, str):
        name = level.strip().upper()
        if name == "WARN":
            name = "WARNING"
        if name not in names:
            raise ValueError(
                f"Unknown logging level {level!r}: use one of {', '.join(n.lower() for n in names)}."
            )
        return int(getattr(logging, name))
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"level must be a logging level such as logging.INFO or 'info', not {level!r}.")
    return level


def disable_progress_bars() -> None:
    """Turn every txt2img progress bar off (loading and generating), until :func:`enable_progress_bars`."""
    global _progress_bars_enabled
    _progress_bars_enabled = False


def enable_progress_bars() -> None:
    """Turn progress bars back on (the default); ``TXT2IMG_DISABLE_PROGRESS_BAR=1`` still keeps them off."""
    global _progress_bars_enabled
    _progress_bars_enabled = True


@contextlib.contextmanager
def progress_bars_off() -> Iterator[None]:
    """Progress bars off inside a ``with`` block, and as they were after it."""
    global _progress_bars_enabled
    before, _progress_bars_enabled = _progress_bars_enabled, False
    try:
        yield
    finally:
        _progress_bars_enabled = before


def progress_bars_disabled() -> bool:
    """True when progress bars are off for the whole process (:func:`disable_progress_bars` or the
    ``TXT2IMG_DISABLE_PROGRESS_BAR`` environment variable set to 1, true, yes or on)."""
    return not _progress_bars_enabled or os.environ.get(PROGRESS_ENV, "").strip().lower() in _TRUE


def progress_bar(total: int, **options: Any) -> tqdm:
    """A tqdm bar of ``total`` steps on stderr; ``options`` are tqdm's (``desc``, ``disable``, ``leave``, ...).

    Off, whatever ``options`` say, when :func:`progress_bars_disabled`.
    """
    from tqdm.auto import tqdm

    if progress_bars_disabled():
        options["disable"] = True
    return tqdm(total=total, **options)

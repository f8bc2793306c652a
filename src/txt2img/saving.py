"""Saving a model folder all at once, so that an interrupted save never leaves a folder that loads wrong.

``staged_folder`` hands out an empty hidden folder beside or inside the target; ``save_pretrained`` writes
everything there, and only then are the entries moved into place (renames on one file system, so no copy),
the entry that makes the folder loadable (``model_index.json`` of a pipeline, ``config.json`` of a component)
last:

- A new folder is the staging folder renamed: it appears complete, or not at all.
- An existing folder keeps what the save does not write (your ``README.md``, the ``.git`` of a Hub clone,
  other files). Its entries being replaced are first moved aside into a hidden folder, the old marker first,
  so that from then on the folder does not load at all until the new marker is in; if anything fails before
  that, everything is moved back. The old entries are deleted only after the new marker is in.
- A save that fails while writing (disk full, an exception, Ctrl-C) leaves the target as it was.
- A process killed during the final renames (milliseconds) leaves a folder without its marker, which refuses to
  load with a clear error rather than loading a mix; the hidden ``.txt2img-*`` folders hold both versions.

A save holds a lock on each hidden folder it makes (``flock``, which the kernel releases when the process dies,
however it dies), so the next save into the same folder can tell the folders of a killed save from those of a
save still running, and removes the former (``remove_stale``). Where there are no such locks (Windows, some
network file systems) nothing is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

if sys.platform != "win32":
    import fcntl

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".txt2img-saving-"
REPLACED_PREFIX = ".txt2img-replaced-"
_TOKEN = "[0-9a-f]{8}"  # secrets.token_hex(4)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str], marker: str) -> Iterator[Path]:
    """Yield an empty folder to write a model into; on success, move its entries into ``target``.

    Args:
        target: The folder to save (created if needed, with its parents).
        marker: The entry whose presence makes the folder loadable; moved in last, moved aside first.

    Raises:
        NotADirectoryError: ``target`` exists and is not a folder.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Cannot save into {target}: it is a file, not a folder.")
    remove_stale(target)
    if target.is_dir():
        stage, lock = _hidden_folder(target, STAGING_PREFIX)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage, lock = _hidden_folder(target.parent, f".{target.name}{STAGING_PREFIX}")
    try:
        yield stage
        if target.is_dir():
            _move_entries(stage, target, marker)
        else:
            os.rename(
                stage, target
            )  # atomic; fails (leaving no half folder) if the target appeared meanwhile
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def _move_entries(stage: Path, target: Path, marker: str) -> None:
    """Move ``stage``'s entries into the existing ``target``, ``marker`` last; undo everything on failure."""
    names = sorted(p.name for p in stage.iterdir() if p.name != marker)
    if (stage / marker).exists():
        names.append(marker)
    aside, lock = _hidden_folder(target, REPLACED_PREFIX)
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for name in [
            marker,
            *names,
        ]:  # the old marker first: the folder stops loading until the new one is in
            old = target / name
            if name not in moved_aside and (old.exists() or old.is_symlink()):
                os.replace(old, aside / name)
                moved_aside.append(name)
        for name in names:
            os.replace(stage / name, target / name)
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.replace(target / name, stage / name)
        for name in reversed(moved_aside):
            os.replace(aside / name, target / name)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
        if lock is not None:
            os.close(lock)


# ---------------------------------------------------------------------------------------------------------
# Folders left by killed saves


def remove_stale(target: Path) -> list[Path]:
    """Delete the hidden folders that killed saves left in and beside ``target``, and return them.

    Only folders named as this module names them (``.txt2img-saving-*`` and ``.txt2img-replaced-*`` inside,
    ``.NAME.txt2img-saving-*`` beside) and whose lock no running save holds; links, files and everything
    else are left alone.
    """
    inside = re.compile(f"({re.escape(STAGING_PREFIX)}|{re.escape(REPLACED_PREFIX)}){_TOKEN}")
    beside = re.compile(f"{re.escape(f'.{target.name}{STAGING_PREFIX}')}{_TOKEN}")
    removed = []
    for folder, pattern in ((target, inside), (target.parent, beside)):
        try:
            candidates = [p for p in folder.iterdir() if pattern.fullmatch(p.name)]
        except OSError:  # not there (yet), or not readable
            continue
        for candidate in candidates:
            try:
                lock = _lock(candidate)
            except OSError:  # a save still running holds it, it is gone, or it is a link or a file
                continue
            if lock is None:  # no locks here: a running save's folder cannot be told apart
                continue
            try:
                shutil.rmtree(candidate, ignore_errors=True)
            finally:
                os.close(lock)
            removed.append(candidate)
    if removed:
        logger.info("Removed what interrupted saves left: %s", ", ".join(str(p) for p in removed))
    return removed


def _hidden_folder(parent: Path, prefix: str) -> tuple[Path, int | None]:
    """Make a new folder ``parent/PREFIX<random hex>`` and lock it; close the returned descriptor to unlock."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        folder.mkdir()
        try:
            lock = _lock(folder)
        except (BlockingIOError, FileNotFoundError):  # another save's remove_stale took it before the lock
            continue
        if lock is None or _is_open_as(folder, lock):
            return folder, lock
        os.close(lock)  # removed by another save between the open and the lock


def _lock(folder: Path) -> int | None:
    """An open descriptor of the folder ``folder`` holding an exclusive ``flock``, released when it is closed or
    the process ends; ``None`` where there are no such locks.

    Raises:
        BlockingIOError: another descriptor holds the lock.
        OSError: ``folder`` is not a folder, is a link, or is gone.
    """
    if sys.platform == "win32":
        return None
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise
    except OSError:  # the file system has no flock (some network file systems)
        os.close(descriptor)
        return None
    return descriptor


def _is_open_as(folder: Path, descriptor: int) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(folder, follow_symlinks=False))
    except FileNotFoundError:
        return False

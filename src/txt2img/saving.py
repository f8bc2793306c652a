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
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

STAGING_PREFIX = ".txt2img-saving-"
REPLACED_PREFIX = ".txt2img-replaced-"


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
    if target.is_dir():
        stage = target / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = target.parent / f".{target.name}{STAGING_PREFIX}{secrets.token_hex(4)}"
    stage.mkdir()
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


def _move_entries(stage: Path, target: Path, marker: str) -> None:
    """Move ``stage``'s entries into the existing ``target``, ``marker`` last; undo everything on failure."""
    names = sorted(p.name for p in stage.iterdir() if p.name != marker)
    if (stage / marker).exists():
        names.append(marker)
    aside = target / f"{REPLACED_PREFIX}{secrets.token_hex(4)}"
    aside.mkdir()
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
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)

"""Find a model's files: a local folder is read in place, a Hub repo id is resolved into the local cache.

Rules (see docs/loading.md):
- a local folder, ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` makes no network request;
- from the Hub only the files that will be read are downloaded: JSON configs, tokenizer files and
  safetensors weights, never pickle weights;
- every failure is an ``OSError`` that names the model and says what to do.

huggingface_hub is imported inside the functions that use it, so ``import txt2img`` stays light.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# The files a component folder may need: configs, tokenizer files, safetensors weights (whole or sharded).
COMPONENT_FILE_PATTERNS = (
    "*.json",
    "*.txt",
    "*.model",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model-*.safetensors",
    "model.safetensors",
    "model-*.safetensors",
)

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def component_patterns(subfolder: str | None) -> list[str]:
    """The download patterns for one component folder (``None``: the repo root)."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return [prefix + pattern for pattern in COMPONENT_FILE_PATTERNS]


def sibling(subfolder: str, name: str) -> str:
    """The folder ``name`` beside ``subfolder`` in a repo (``"unet"`` → ``"scheduler"``, ``"a/unet"`` → ``"a/scheduler"``),
    where the diffusers layout keeps a component's tokenizer or sampler."""
    return (Path(subfolder.strip("/")).parent / name).as_posix()


# ---------------------------------------------------------------------------------------------------------
# A model's files stay inside its folder


def check_relative(subfolder: str, root: Path | str) -> None:
    """Refuse a ``subfolder`` that is absolute or climbs out with ``..``.

    Raises:
        OSError: naming the subfolder and the model.
    """
    parts = Path(subfolder).parts
    if Path(subfolder).is_absolute() or ".." in parts or "\\" in subfolder:
        raise OSError(
            f"subfolder={subfolder!r} points outside the model {str(root)!r}: a component's folder is a relative "
            "path inside the model, such as 'vae'."
        )


def subfolder_of(root: Path, subfolder: str) -> Path:
    """``root / subfolder``, refusing one that leads out of ``root`` (``..``, an absolute path, or a link).

    Raises:
        OSError: the folder is outside ``root``, naming both and where it leads.
    """
    check_relative(subfolder, root)
    folder = root / subfolder
    if folder.exists() and not is_inside(folder, root):
        raise OSError(
            f"{folder} is a link leading out of the model folder {root} (to {folder.resolve()}); txt2img reads a "
            "model only from inside its folder. Copy the component into the folder instead of linking it."
        )
    return folder


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, links followed, lies inside ``root`` (links followed too)."""
    return path.resolve().is_relative_to(root.resolve())


def is_plain_file_name(name: str) -> bool:
    """Whether ``name`` names a file directly in a folder: no separator, not ``..``, not absolute."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def is_offline(local_files_only: bool) -> bool:
    """True when no request may be made: ``local_files_only`` or ``HF_HUB_OFFLINE`` set to a true value."""
    return local_files_only or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {
        "1",
        "true",
        "yes",
        "on",
    }


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    allow_patterns: Iterable[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Return the local folder holding a model's files, downloading them from the Hub if needed.

    Args:
        name_or_path: A local folder, or a Hub repo id such as ``"org/model"``.
        subfolder: A folder inside the model, e.g. ``"vae"``.
        allow_patterns: Which files to fetch from the Hub; defaults to the component files of ``subfolder``.
        revision: A Hub branch, tag or commit sha. Ignored for local folders.
        cache_dir: The Hub cache folder (default: huggingface_hub's).
        local_files_only: Use the Hub cache only; make no request.
        token: A Hub token, for private or gated repos.

    Returns:
        The folder (``subfolder`` included).

    Raises:
        OSError: the folder or repo does not exist, or cannot be reached offline.
    """
    path = Path(name_or_path).expanduser()
    if subfolder:
        check_relative(subfolder, path)
    if path.is_dir():
        folder = subfolder_of(path, subfolder) if subfolder else path
        if not folder.is_dir():
            raise OSError(f"{path} has no subfolder {subfolder!r}: is this the right model folder?")
        return folder
    if path.exists():
        raise OSError(f"{path} is a file, not a model folder: pass the folder that holds config.json.")
    name = str(name_or_path)
    if not _REPO_ID.match(name):
        raise OSError(
            f"{name!r} is neither a local folder nor a Hugging Face Hub repo id (like 'org/model'). "
            "Check the path or the repo id."
        )
    patterns = list(allow_patterns) if allow_patterns is not None else component_patterns(subfolder)
    root = _snapshot(name, patterns, revision, cache_dir, local_files_only, token)
    folder = subfolder_of(root, subfolder) if subfolder else root
    if not folder.is_dir():
        raise OSError(f"The Hub repo {name!r} (revision {revision or 'main'}) has no folder {subfolder!r}.")
    return folder


def _snapshot(
    repo_id: str,
    patterns: list[str],
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    token: str | bool | None,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from txt2img import __version__

    offline = is_offline(local_files_only)
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=offline,
            token=token,
            allow_patterns=patterns,
            library_name="txt2img",
            library_version=__version__,
        )
    except LocalEntryNotFoundError as error:
        if offline:
            raise OSError(
                f"{repo_id!r} (revision {revision or 'main'}) is not in the local Hub cache and downloads are "
                "off (local_files_only=True or HF_HUB_OFFLINE=1). Download it once with network access, "
                "or pass a local folder."
            ) from error
        raise OSError(
            f"Could not reach the Hugging Face Hub to download {repo_id!r}, and it is not in the local cache. "
            "Check the network, or pass a local folder."
        ) from error
    except GatedRepoError as error:
        raise OSError(f"{repo_id!r} is gated: accept its terms on the Hub and pass token=...") from error
    except RepositoryNotFoundError as error:
        raise OSError(
            f"{repo_id!r} is not a local folder and no Hub repo of that name was found "
            "(or it is private: pass token=...)."
        ) from error
    except RevisionNotFoundError as error:
        raise OSError(
            f"{repo_id!r} has no revision {revision!r}: check the branch, tag or commit."
        ) from error
    except HfHubHTTPError as error:
        raise OSError(f"Downloading {repo_id!r} from the Hub failed: {error}") from error
    return Path(root)


def find_pickle_files(folder: Path) -> list[str]:
    """Names of pickle weight files (which txt2img never loads) in ``folder``.

    For a folder inside the Hub cache the repo's cached file listing is read too, since pickle files are
    never downloaded; no request is made.
    """
    names = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    names.update(_cached_listing(folder))
    return sorted(name for name in names if Path(name).suffix in PICKLE_SUFFIXES)


def _cached_listing(folder: Path) -> set[str]:
    """File names directly in ``folder`` as its Hub repo lists them, for a folder of a cached snapshot
    (``.../models--org--name/snapshots/<sha>/<sub>``); empty elsewhere or when no listing is cached."""
    snapshot = next((p for p in (folder, *folder.parents) if p.parent.name == "snapshots"), None)
    if snapshot is None or not snapshot.parent.parent.name.startswith("models--"):
        return set()
    try:
        from huggingface_hub import get_cached_repo_tree

        repo_id = snapshot.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
        files = get_cached_repo_tree(repo_id, revision=snapshot.name, cache_dir=snapshot.parent.parent.parent)
    except Exception:  # noqa: BLE001 - an older huggingface_hub or no cached listing: nothing to add
        return set()
    prefix = folder.relative_to(snapshot).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    return {
        f.path[len(prefix) :] for f in files if f.path.startswith(prefix) and "/" not in f.path[len(prefix) :]
    }


def push_folder(
    save: Callable[[Path], None],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    keep_existing: Iterable[str] = (),
) -> str:
    """Save into a temporary folder with ``save`` and upload it to the Hub repo ``repo_id``.

    Args:
        keep_existing: Files (paths in the repo, e.g. ``"README.md"``) not uploaded when the repo already
            has them at ``revision``.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    kept = [name for name in keep_existing if api.file_exists(repo_id, name, revision=revision)]
    if kept:
        logger.info("%s already has %s: kept, not uploaded.", repo_id, ", ".join(kept))
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            revision=revision,
            commit_message=commit_message or "Upload with txt2img",
            ignore_patterns=kept or None,
        )
    return str(info)

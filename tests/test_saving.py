"""save_pretrained is all at once: a save that fails or is killed never leaves a folder that loads into something
else, and a failed save into an existing folder leaves what was there (txt2img.saving)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

if sys.platform != "win32":
    import fcntl

import pytest
import torch

import txt2img.modeling
from tiny import make_pipeline, make_vae
from txt2img import Txt2ImgPipeline, VAEDecoder
from txt2img.saving import REPLACED_PREFIX, STAGING_PREFIX, remove_stale


@pytest.fixture(scope="module")
def other_pipe(tmp_path_factory: pytest.TempPathFactory) -> Txt2ImgPipeline:
    """A pipeline with other weights than the shared one (seed 1): what a save replaces must be told apart."""
    return make_pipeline(tmp_path_factory.mktemp("other"), seed=1)


def same_weights(a: Txt2ImgPipeline, b: Txt2ImgPipeline) -> bool:
    return all(
        torch.equal(x, y)
        for name in a.component_names
        for x, y in zip(
            a.components[name].state_dict().values(), b.components[name].state_dict().values(), strict=True
        )
    )


def leftovers(folder: Path) -> list[str]:
    """Hidden staging or set-aside folders of a save, in ``folder`` and beside it."""
    places = [folder.parent, folder] if folder.is_dir() else [folder.parent]
    return [
        p.name
        for place in places
        for p in place.iterdir()
        if STAGING_PREFIX in p.name or REPLACED_PREFIX in p.name
    ]


def fail_on_call(monkeypatch: pytest.MonkeyPatch, number: int, error: BaseException) -> None:
    """Make the ``number``-th weights file written raise ``error`` (the others are written as usual)."""
    original = txt2img.modeling.save_state_dict
    calls = []

    def save(module: torch.nn.Module, path: Path) -> None:
        calls.append(path)
        if len(calls) == number:
            path.write_bytes(b"half a file")
            raise error
        original(module, path)

    monkeypatch.setattr(txt2img.modeling, "save_state_dict", save)


def test_a_save_appears_whole_and_leaves_nothing_behind(pipe: Txt2ImgPipeline, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "new"
    pipe.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md",
        "gan",
        "model_index.json",
        "text_encoder",
        "vae",
    ]
    assert leftovers(target) == []
    assert same_weights(Txt2ImgPipeline.from_pretrained(target), pipe)


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"]
)
def test_a_failed_save_into_a_new_folder_leaves_no_folder(
    pipe: Txt2ImgPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    fail_on_call(monkeypatch, 2, error)  # the first component is written, the second fails half-way
    target = tmp_path / "new"
    with pytest.raises(type(error)):
        pipe.save_pretrained(target)
    assert not target.exists()
    assert leftovers(target) == []


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"]
)
def test_a_failed_save_into_an_existing_folder_keeps_what_was_there(
    pipe: Txt2ImgPipeline,
    other_pipe: Txt2ImgPipeline,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
) -> None:
    target = tmp_path / "model"
    pipe.save_pretrained(target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    fail_on_call(monkeypatch, 2, error)
    with pytest.raises(type(error)):
        other_pipe.save_pretrained(target, overwrite_model_card=True)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before  # byte for byte, and no file added
    assert leftovers(target) == []
    assert same_weights(Txt2ImgPipeline.from_pretrained(target), pipe)


def test_a_failure_while_moving_into_place_is_rolled_back(
    pipe: Txt2ImgPipeline, other_pipe: Txt2ImgPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model"
    pipe.save_pretrained(target)
    real_replace = os.replace

    def replace(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        if Path(dst) == target / "model_index.json" and STAGING_PREFIX in str(src):
            raise OSError("the disk went away")  # after every component is in place, before the index
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk went away"):
        other_pipe.save_pretrained(target)
    monkeypatch.undo()
    assert leftovers(target) == []
    assert same_weights(Txt2ImgPipeline.from_pretrained(target), pipe)


def test_saving_over_a_folder_replaces_the_model_and_keeps_other_files(
    pipe: Txt2ImgPipeline, other_pipe: Txt2ImgPipeline, tmp_path: Path
) -> None:
    target = tmp_path / "clone"
    pipe.save_pretrained(target)
    (target / "README.md").write_text("my own card")
    (target / ".git").mkdir()
    (target / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (target / "notes.txt").write_text("keep me")
    other_pipe.save_pretrained(target)
    assert same_weights(Txt2ImgPipeline.from_pretrained(target), other_pipe)
    assert (target / "README.md").read_text() == "my own card"
    assert (target / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (target / "notes.txt").read_text() == "keep me"
    assert leftovers(target) == []
    other_pipe.save_pretrained(target, overwrite_model_card=True)
    assert "txt2img" in (target / "README.md").read_text()


def test_a_component_save_is_all_at_once_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "vae"
    make_vae(seed=0).save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    fail_on_call(monkeypatch, 1, OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        make_vae(seed=3).save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    monkeypatch.undo()
    assert torch.equal(
        VAEDecoder.from_pretrained(folder).decoder.conv_in.weight, make_vae(seed=0).decoder.conv_in.weight
    )


def test_saving_onto_a_file_is_refused(pipe: Txt2ImgPipeline, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="it is a file, not a folder"):
        pipe.save_pretrained(tmp_path / "file")


# ---------------------------------------------------------------------------------------------------------
# Killed in the middle: a real SIGKILL, in a child process

KILLED_SAVE = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import txt2img.modeling
from tiny import make_pipeline

original = txt2img.modeling.save_state_dict
count = 0

def save(module, path):
    global count
    count += 1
    original(module, path)
    if count == {stop_after}:
        Path({ready!r}).write_text("ready")
        time.sleep(600)  # killed here

txt2img.modeling.save_state_dict = save
make_pipeline(Path({scratch!r}), seed=1).save_pretrained({target!r})
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_save_killed_in_the_middle_leaves_the_old_model(pipe: Txt2ImgPipeline, tmp_path: Path) -> None:
    stop_after = 2  # the generator's and the decoder's weights written, the text encoder's too: killed there
    target = tmp_path / "model"
    pipe.save_pretrained(target)
    ready = tmp_path / "ready"
    code = KILLED_SAVE.format(
        tests=str(Path(__file__).parent),
        stop_after=stop_after,
        ready=str(ready),
        scratch=str(tmp_path / "s"),
        target=str(target),
    )
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:] if child.stderr else ""
            assert time.monotonic() < deadline, "the child never reached the middle of its save"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    loaded = Txt2ImgPipeline.from_pretrained(target)  # the old model, untouched
    assert same_weights(loaded, pipe)
    assert leftovers(target)  # the killed save's staging folder, holding the new model
    pipe.save_pretrained(target)  # a later save succeeds, and removes what the killed one left
    assert same_weights(Txt2ImgPipeline.from_pretrained(target), pipe)
    assert leftovers(target) == []


@pytest.mark.skipif(sys.platform == "win32", reason="a killed save's folders are told apart by a flock")
def test_a_later_save_removes_what_killed_saves_left_and_nothing_else(
    pipe: Txt2ImgPipeline, other_pipe: Txt2ImgPipeline, tmp_path: Path
) -> None:
    target = tmp_path / "model"
    pipe.save_pretrained(target)
    killed = [  # as saves killed before their moves (inside and beside) and during them leave them
        target / f"{STAGING_PREFIX}0123abcd",
        tmp_path / f".model{STAGING_PREFIX}89abcdef",
        target / f"{REPLACED_PREFIX}deadbeef",
    ]
    for folder in killed:
        (folder / "vae").mkdir(parents=True)
        (folder / "vae" / "config.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    others = [
        target / f"{STAGING_PREFIX}notes",  # not a name a save gives
        target / f"{STAGING_PREFIX}0123abcd.txt",
        tmp_path / f".other{STAGING_PREFIX}0123abcd",  # another folder's
        target / "notes" / f"{STAGING_PREFIX}0123abcd",  # not where this save looks
    ]
    for folder in others:
        folder.mkdir(parents=True)
    link = target / f"{STAGING_PREFIX}0badf00d"
    link.symlink_to(outside, target_is_directory=True)
    running = target / f"{STAGING_PREFIX}00c0ffee"  # the folder of a save still running elsewhere
    running.mkdir()
    descriptor = os.open(running, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as that save holds it
    try:
        other_pipe.save_pretrained(target)
    finally:
        os.close(descriptor)
    assert [folder for folder in killed if folder.exists()] == []
    assert all(folder.is_dir() for folder in [*others, running])
    assert link.is_symlink() and (outside / "keep.txt").read_text() == "keep"
    assert same_weights(Txt2ImgPipeline.from_pretrained(target), other_pipe)


@pytest.mark.skipif(sys.platform == "win32", reason="a killed save's folders are told apart by a flock")
@pytest.mark.parametrize("exists", [True, False], ids=["existing-folder", "new-folder"])
def test_a_save_in_progress_is_not_taken_for_a_killed_one(
    pipe: Txt2ImgPipeline,
    other_pipe: Txt2ImgPipeline,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    exists: bool,
) -> None:
    target = tmp_path / "model"
    if exists:
        pipe.save_pretrained(target)
    original = txt2img.modeling.save_state_dict
    removed: list[Path] = []

    def save(module: torch.nn.Module, path: Path) -> None:
        original(module, path)
        # Another save starting now, into the pipeline's folder or into this component's (stage/.vae.txt2img-...).
        component = path.parent.parent / path.parent.name.split(STAGING_PREFIX)[0].lstrip(".")
        removed.extend(remove_stale(target) + remove_stale(component))

    monkeypatch.setattr(txt2img.modeling, "save_state_dict", save)
    other_pipe.save_pretrained(target)
    assert removed == []
    assert same_weights(Txt2ImgPipeline.from_pretrained(target), other_pipe)
    assert leftovers(target) == []

"""Loading from the Hugging Face Hub, against a local stand-in server (tests/hub_server.py): no internet.

What is checked: the same images as the local pipeline, only the needed files downloaded (never pickle
weights), pinned revisions honoured, offline loads from the cache with no socket opened, and clear
``OSError``s for unknown repos, unknown revisions, missing cache entries and pickle-only weights.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from hub_server import HubServer, Request, serve_hub, set_offline
from tiny import make_pipeline
from txt2img import TextEncoder, Txt2ImgPipeline, VAEDecoder

REPO = "org/tiny"
PROMPTS = ["a red cat", "two dogs"]

# Files a repo may hold that a pipeline load must never fetch: pickle weights, fp16 variants, other folders.
UNNEEDED_FILES = {
    "vae/diffusion_pytorch_model.bin": b"pickle weights: never to be downloaded",
    "text_encoder/pytorch_model.bin": b"pickle weights: never to be downloaded",
    "gan/diffusion_pytorch_model.fp16.safetensors": b"an fp16 variant: not needed",
    "gan/diffusion_pytorch_model.ckpt": b"a checkpoint: never to be downloaded",
    "unused/big.safetensors": b"\0" * 4096,
    "unused/config.json": b"{}",
}
# What a pipeline load needs (the files tests/tiny.py's pipeline saves, README.md aside).
NEEDED_FILES = {
    "model_index.json",
    "gan/config.json",
    "gan/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
}


# ---------------------------------------------------------------------------------------------------------
# Helpers and fixtures


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with serve_hub(monkeypatch, tmp_path / "hf-home") as server:
        yield server


@pytest.fixture(scope="module")
def expected_images(pipe: Txt2ImgPipeline) -> np.ndarray:
    return images_of(pipe)


@pytest.fixture(scope="module")
def other_pipe(tmp_path_factory: pytest.TempPathFactory) -> Txt2ImgPipeline:
    """A second tiny pipeline with other weights (seed 1)."""
    return make_pipeline(tmp_path_factory.mktemp("other-pipe"), seed=1)


@pytest.fixture(scope="module")
def other_saved(other_pipe: Txt2ImgPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("other-saved") / "tiny-pipe"
    other_pipe.save_pretrained(folder)
    return folder


def images_of(pipe: Txt2ImgPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images  # type: ignore[return-value]


def copy_model(source: Path, destination: Path, extra: dict[str, bytes] | None = None) -> Path:
    """Copy a saved model folder, adding files ``{relative path: content}``."""
    shutil.copytree(source, destination)
    for name, data in (extra or {}).items():
        path = destination / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return destination


def cached_files(cache_dir: Path, repo_id: str = REPO) -> set[str]:
    """Repo paths of every file in the snapshots of ``repo_id`` in the Hub cache."""
    storage = cache_dir / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not storage.is_dir():
        return set()
    return {
        path.relative_to(snapshot).as_posix()
        for snapshot in storage.iterdir()
        for path in snapshot.rglob("*")
        if path.is_file()
    }


def forbid_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Make every attempt to open a network connection (or resolve a name) raise; returns the attempts.

    The returned list must stay empty: a library that catches the error and falls back to its cache would
    otherwise hide that it tried.
    """
    attempts: list[tuple] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError(f"network use is forbidden in this test: {args[1:] or args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def assert_same_state(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


# ---------------------------------------------------------------------------------------------------------
# Loading from the Hub


def test_pipeline_from_hub_matches_local_and_fetches_only_needed_files(
    hub: HubServer, saved_pipeline: Path, expected_images: np.ndarray, tmp_path: Path
) -> None:
    repo = copy_model(saved_pipeline, tmp_path / "repo", UNNEEDED_FILES)
    sha = hub.add_revision(REPO, repo)

    loaded = Txt2ImgPipeline.from_pretrained(REPO)

    assert np.array_equal(images_of(loaded), expected_images)
    requested = hub.requested_files(REPO)
    assert NEEDED_FILES <= hub.downloaded_files(REPO)
    assert not requested & set(UNNEEDED_FILES), f"fetched: {sorted(requested & set(UNNEEDED_FILES))}"
    assert not any(name.endswith((".bin", ".ckpt", ".pt", ".pth", ".pkl")) for name in requested)
    # Every file was fetched at the one commit `main` pointed to.
    assert {revision for _, revision, _ in hub.file_requests(REPO)} == {sha}
    cached = cached_files(hub.cache_dir)
    assert NEEDED_FILES <= cached
    assert not cached & set(UNNEEDED_FILES)
    assert not list(hub.cache_dir.rglob("*.bin"))


def test_pipeline_from_hub_skips_components_passed_in(
    hub: HubServer, pipe: Txt2ImgPipeline, saved_pipeline: Path, expected_images: np.ndarray
) -> None:
    hub.add_revision(REPO, saved_pipeline)

    loaded = Txt2ImgPipeline.from_pretrained(REPO, vae=pipe.vae)

    assert loaded.vae is pipe.vae
    assert np.array_equal(images_of(loaded), expected_images)
    assert not {name for name in hub.requested_files(REPO) if name.startswith("vae/")}
    assert "gan/diffusion_pytorch_model.safetensors" in hub.downloaded_files(REPO)


def test_second_load_makes_one_request_and_downloads_nothing(hub: HubServer, saved_pipeline: Path) -> None:
    hub.add_revision(REPO, saved_pipeline)
    Txt2ImgPipeline.from_pretrained(REPO)
    hub.clear_requests()

    Txt2ImgPipeline.from_pretrained(REPO)

    # Only the branch is resolved again (main may have moved); the files come from the cache.
    assert hub.request_paths == [f"/api/models/{REPO}/revision/main"]


def test_pinned_revision_is_honoured(
    hub: HubServer,
    saved_pipeline: Path,
    other_saved: Path,
    expected_images: np.ndarray,
    other_pipe: Txt2ImgPipeline,
) -> None:
    old_sha = hub.add_revision(REPO, saved_pipeline, branches=("main", "v1"))
    new_sha = hub.add_revision(REPO, other_saved)  # moves main; v1 stays
    new_images = images_of(other_pipe)
    assert old_sha != new_sha
    assert not np.array_equal(new_images, expected_images)

    by_sha = Txt2ImgPipeline.from_pretrained(REPO, revision=old_sha)
    assert {revision for _, revision, _ in hub.file_requests(REPO)} == {old_sha}
    assert np.array_equal(images_of(by_sha), expected_images)

    assert np.array_equal(images_of(Txt2ImgPipeline.from_pretrained(REPO, revision="v1")), expected_images)
    assert np.array_equal(images_of(Txt2ImgPipeline.from_pretrained(REPO)), new_images)
    assert np.array_equal(images_of(Txt2ImgPipeline.from_pretrained(REPO, revision="main")), new_images)


def test_components_come_from_the_commit_of_model_index(
    hub: HubServer, saved_pipeline: Path, other_saved: Path, expected_images: np.ndarray
) -> None:
    """`main` moves right after model_index.json is served: the components must still come from its commit."""
    old_sha = hub.add_revision(REPO, saved_pipeline)
    new_sha = hub.add_revision(REPO, other_saved, branches=())

    def move_main(request: Request) -> None:
        if request.method == "GET" and request.path.endswith("/model_index.json"):
            hub.set_ref(REPO, "main", new_sha)

    hub.add_hook(move_main)
    loaded = Txt2ImgPipeline.from_pretrained(REPO)

    assert hub.request_paths.count(f"/api/models/{REPO}/revision/main") == 1
    assert {revision for _, revision, _ in hub.file_requests(REPO)} == {old_sha}
    assert np.array_equal(images_of(loaded), expected_images)


def test_vae_from_hub_subfolder(
    hub: HubServer, pipe: Txt2ImgPipeline, saved_pipeline: Path, tmp_path: Path
) -> None:
    hub.add_revision(REPO, copy_model(saved_pipeline, tmp_path / "repo", UNNEEDED_FILES))

    vae = VAEDecoder.from_pretrained(REPO, subfolder="vae")

    assert isinstance(vae, VAEDecoder)
    assert_same_state(vae, pipe.vae)
    assert hub.downloaded_files(REPO) == {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"}


def test_text_encoder_from_hub_subfolder(
    hub: HubServer, pipe: Txt2ImgPipeline, saved_pipeline: Path, tmp_path: Path
) -> None:
    hub.add_revision(REPO, copy_model(saved_pipeline, tmp_path / "repo", UNNEEDED_FILES))

    encoder = TextEncoder.from_pretrained(REPO, subfolder="text_encoder")

    assert isinstance(encoder, TextEncoder)
    assert_same_state(encoder, pipe.text_encoder)
    assert encoder.config == pipe.text_encoder.config
    ids, mask = encoder.tokenize(PROMPTS)
    want_ids, want_mask = pipe.text_encoder.tokenize(PROMPTS)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    with torch.inference_mode():
        got, want = encoder.encode(PROMPTS), pipe.text_encoder.encode(PROMPTS)
    assert torch.equal(got.hidden_states, want.hidden_states) and torch.equal(got.pooled, want.pooled)
    requested = hub.requested_files(REPO)
    assert "text_encoder/model.safetensors" in requested
    assert all(name.startswith(("text_encoder/", "tokenizer/")) for name in requested), sorted(requested)
    assert "text_encoder/pytorch_model.bin" not in requested


def test_sharded_weights_from_hub(
    hub: HubServer, pipe: Txt2ImgPipeline, saved_pipeline: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    repo = tmp_path / "repo"
    (repo / "vae").mkdir(parents=True)
    shutil.copy(saved_pipeline / "vae" / "config.json", repo / "vae" / "config.json")
    state = {k: v.contiguous() for k, v in pipe.vae.state_dict().items()}
    keys = sorted(state)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(repo / "vae" / name), metadata={"format": "pt"})
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (repo / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (repo / "vae" / "diffusion_pytorch_model-00001-of-00002.bin").write_bytes(b"pickle: not to be downloaded")
    hub.add_revision(REPO, repo)

    vae = VAEDecoder.from_pretrained(REPO, subfolder="vae")

    assert_same_state(vae, pipe.vae)
    assert hub.downloaded_files(REPO) == {
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors.index.json",
        *(f"vae/{name}" for name in shards),
    }


def test_cache_dir_and_token_are_used_for_every_request(
    hub: HubServer, saved_pipeline: Path, expected_images: np.ndarray, tmp_path: Path
) -> None:
    hub.add_revision(REPO, saved_pipeline)
    cache_dir = tmp_path / "my-cache"

    loaded = Txt2ImgPipeline.from_pretrained(REPO, cache_dir=cache_dir, token="hf_local_test_token")

    assert np.array_equal(images_of(loaded), expected_images)
    assert NEEDED_FILES <= cached_files(cache_dir)
    assert cached_files(hub.cache_dir) == set()
    requests = hub.requests
    assert requests
    for request in requests:
        assert request.headers.get("authorization") == "Bearer hf_local_test_token", request.path
        assert "txt2img/" in request.headers.get("user-agent", ""), request.path


# ---------------------------------------------------------------------------------------------------------
# Offline


def test_local_files_only_after_download_needs_no_network(
    hub: HubServer, saved_pipeline: Path, expected_images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_revision(REPO, saved_pipeline)
    Txt2ImgPipeline.from_pretrained(REPO)
    hub.stop()
    attempts = forbid_network(monkeypatch)

    loaded = Txt2ImgPipeline.from_pretrained(REPO, local_files_only=True)

    assert attempts == []
    assert np.array_equal(images_of(loaded), expected_images)


def test_hf_hub_offline_after_download_needs_no_network(
    hub: HubServer, saved_pipeline: Path, expected_images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_revision(REPO, saved_pipeline)
    Txt2ImgPipeline.from_pretrained(REPO)
    vae = VAEDecoder.from_pretrained(REPO, subfolder="vae")
    hub.stop()
    set_offline(monkeypatch)
    attempts = forbid_network(monkeypatch)

    loaded = Txt2ImgPipeline.from_pretrained(REPO)
    vae_again = VAEDecoder.from_pretrained(REPO, subfolder="vae")

    assert attempts == []
    assert np.array_equal(images_of(loaded), expected_images)
    assert_same_state(vae_again, vae)


def test_pinned_revision_offline(
    hub: HubServer,
    saved_pipeline: Path,
    other_saved: Path,
    expected_images: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old_sha = hub.add_revision(REPO, saved_pipeline)
    hub.add_revision(REPO, other_saved)
    Txt2ImgPipeline.from_pretrained(REPO, revision=old_sha)
    Txt2ImgPipeline.from_pretrained(REPO)
    hub.stop()
    attempts = forbid_network(monkeypatch)

    loaded = Txt2ImgPipeline.from_pretrained(REPO, revision=old_sha, local_files_only=True)

    assert attempts == []
    assert np.array_equal(images_of(loaded), expected_images)


def test_local_folder_makes_no_network_call(
    saved_pipeline: Path, expected_images: np.ndarray, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An unreachable endpoint and an empty cache: nothing may even be looked up.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    attempts = forbid_network(monkeypatch)

    loaded = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    vae = VAEDecoder.from_pretrained(saved_pipeline, subfolder="vae")
    encoder = TextEncoder.from_pretrained(saved_pipeline / "text_encoder")

    assert attempts == []
    assert np.array_equal(images_of(loaded), expected_images)
    assert_same_state(vae, loaded.vae)
    assert_same_state(encoder, loaded.text_encoder)
    assert not (tmp_path / "empty-cache").exists()


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_repo_is_a_clear_oserror(hub: HubServer, saved_pipeline: Path) -> None:
    hub.add_revision(REPO, saved_pipeline)

    with pytest.raises(OSError, match="org/no-such-model") as info:
        Txt2ImgPipeline.from_pretrained("org/no-such-model")
    assert "no Hub repo" in str(info.value)
    with pytest.raises(OSError, match="org/no-such-model"):
        VAEDecoder.from_pretrained("org/no-such-model", subfolder="vae")
    assert hub.requested_files() == set()


@pytest.mark.parametrize("revision", ["no-such-branch", "0123456789abcdef0123456789abcdef01234567"])
def test_unknown_revision_is_a_clear_oserror(hub: HubServer, saved_pipeline: Path, revision: str) -> None:
    hub.add_revision(REPO, saved_pipeline)

    with pytest.raises(OSError, match="has no revision") as info:
        Txt2ImgPipeline.from_pretrained(REPO, revision=revision)
    assert REPO in str(info.value) and revision in str(info.value)
    assert hub.requested_files() == set()


def test_local_files_only_without_cache_is_a_clear_oserror(hub: HubServer, saved_pipeline: Path) -> None:
    hub.add_revision(REPO, saved_pipeline)

    with pytest.raises(OSError, match="not in the local Hub cache") as info:
        Txt2ImgPipeline.from_pretrained(REPO, local_files_only=True)
    assert REPO in str(info.value)
    with pytest.raises(OSError, match="not in the local Hub cache"):
        TextEncoder.from_pretrained(REPO, subfolder="text_encoder", local_files_only=True)
    assert hub.requests == []


def test_hf_hub_offline_without_cache_is_a_clear_oserror(
    hub: HubServer, saved_pipeline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_revision(REPO, saved_pipeline)
    set_offline(monkeypatch)

    with pytest.raises(OSError, match="not in the local Hub cache"):
        Txt2ImgPipeline.from_pretrained(REPO)
    assert hub.requests == []


def test_offline_with_a_partial_cache_is_a_clear_oserror(
    hub: HubServer, saved_pipeline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the VAE was downloaded: an offline pipeline load must say what is missing, not half-load."""
    hub.add_revision(REPO, saved_pipeline)
    VAEDecoder.from_pretrained(REPO, subfolder="vae")
    hub.stop()
    attempts = forbid_network(monkeypatch)

    with pytest.raises(OSError, match="not in the local Hub cache"):
        Txt2ImgPipeline.from_pretrained(REPO, local_files_only=True)
    with pytest.raises(OSError, match="not in the local Hub cache"):
        TextEncoder.from_pretrained(REPO, subfolder="text_encoder", local_files_only=True)
    assert attempts == []


def test_pickle_only_weights_are_refused_without_download(
    hub: HubServer, saved_pipeline: Path, tmp_path: Path
) -> None:
    pickle_only = {"vae/diffusion_pytorch_model.bin": b"not to be unpickled"}
    repo = copy_model(saved_pipeline, tmp_path / "repo", pickle_only)
    (repo / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    hub.add_revision(REPO, repo)

    with pytest.raises(OSError, match="(?i)safetensors") as info:
        Txt2ImgPipeline.from_pretrained(REPO)
    assert "vae" in str(info.value)
    with pytest.raises(OSError, match="(?i)safetensors"):
        VAEDecoder.from_pretrained(REPO, subfolder="vae")

    assert "vae/diffusion_pytorch_model.bin" not in hub.requested_files(REPO)
    assert "vae/config.json" in hub.downloaded_files(REPO)
    assert not list(hub.cache_dir.rglob("*.bin"))


# ---------------------------------------------------------------------------------------------------------
# Pickle-only repos and the diffusers tokenizer layout on the Hub


# Pickle files are never downloaded, so the advice comes from the repo's cached file listing.
@pytest.mark.parametrize("component", ["vae", "text_encoder"])
def test_pickle_only_weights_on_the_hub_get_the_pickle_advice(
    hub: HubServer, saved_pipeline: Path, tmp_path: Path, component: str
) -> None:
    weights = {"vae": "diffusion_pytorch_model", "text_encoder": "model"}[component]
    pickle_name = {"vae": "diffusion_pytorch_model.bin", "text_encoder": "pytorch_model.bin"}[component]
    pickle_only = {f"{component}/{pickle_name}": b"not to be unpickled"}
    repo = copy_model(saved_pipeline, tmp_path / "repo", pickle_only)
    (repo / component / f"{weights}.safetensors").unlink()
    hub.add_revision(REPO, repo)

    with pytest.raises(OSError) as info:
        Txt2ImgPipeline.from_pretrained(REPO)

    assert f"{component}/{pickle_name}" not in hub.requested_files(REPO)
    assert "pickle" in str(info.value) and pickle_name in str(info.value), str(info.value)


# The diffusers layout keeps the tokenizer in a sibling tokenizer/ folder: the pipeline fetches it too.
def test_pipeline_with_sibling_tokenizer_folder_from_hub(
    hub: HubServer, saved_pipeline: Path, expected_images: np.ndarray, tmp_path: Path
) -> None:
    repo = copy_model(saved_pipeline, tmp_path / "repo")
    (repo / "tokenizer").mkdir()
    tokenizer_prefixes = ("tokenizer", "vocab", "merges", "special")
    moved = [p for p in (repo / "text_encoder").iterdir() if p.name.startswith(tokenizer_prefixes)]
    assert moved
    for path in moved:
        path.rename(repo / "tokenizer" / path.name)
    assert np.array_equal(images_of(Txt2ImgPipeline.from_pretrained(repo)), expected_images)  # fine locally
    hub.add_revision(REPO, repo)

    loaded = Txt2ImgPipeline.from_pretrained(REPO)

    assert np.array_equal(images_of(loaded), expected_images)

"""With a local folder or ``local_files_only=True``, no socket is opened: not a connection, not a name lookup,
not even a socket object. An audit hook (PEP 578) sees every socket Python creates, whichever library asks."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from hub_server import HubServer, serve_hub, set_offline
from txt2img import DEFAULT_MODEL, GANGenerator, TextEncoder, Txt2ImgPipeline, VAEDecoder

REPO = "org/tiny"
_forbidden: list[list[str]] = []  # while not empty, socket events are recorded in its last list and refused


def _audit(event: str, args: tuple) -> None:  # type: ignore[type-arg]
    if _forbidden and event.startswith("socket."):
        _forbidden[-1].append(event)
        raise OSError(f"a socket was asked for ({event}) while the network is forbidden")


sys.addaudithook(_audit)  # hooks cannot be removed: this one does nothing unless a test switches it on


@contextlib.contextmanager
def sockets_forbidden() -> Iterator[list[str]]:
    """Refuse and record every socket operation inside the block; tests assert the list stays empty (a library
    that caught the refusal and carried on would otherwise hide that it tried)."""
    attempts: list[str] = []
    _forbidden.append(attempts)
    try:
        yield attempts
    finally:
        _forbidden.remove(attempts)


def images(pipe: Txt2ImgPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images  # type: ignore[return-value]


def test_the_hook_sees_a_socket() -> None:
    import socket

    with sockets_forbidden() as attempts, pytest.raises(OSError, match="network is forbidden"):
        socket.create_connection(("127.0.0.1", 9))
    assert attempts and attempts[0].startswith("socket.")


def test_a_local_folder_opens_no_socket(
    saved_pipeline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # nothing cached to fall back on
    with sockets_forbidden() as attempts:
        images(Txt2ImgPipeline.from_pretrained(saved_pipeline))
        VAEDecoder.from_pretrained(saved_pipeline, subfolder="vae")
        GANGenerator.from_pretrained(saved_pipeline / "gan")
        TextEncoder.from_pretrained(saved_pipeline, subfolder="text_encoder")
        images(Txt2ImgPipeline.from_pretrained(DEFAULT_MODEL))
    assert attempts == []


def test_a_transformers_text_encoder_from_a_local_folder_opens_no_socket(
    saved_pipeline: Path, tmp_path: Path
) -> None:
    """Architectures other than CLIP load through transformers, which must not look anything up either."""
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(saved_pipeline / "text_encoder" / name, folder / name)
    with sockets_forbidden() as attempts, torch.no_grad():
        encoder = TextEncoder.from_pretrained(folder, local_files_only=True)
        assert encoder.encode("a red circle").hidden_states.shape[-1] == 32
    assert attempts == []


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with serve_hub(monkeypatch, tmp_path / "hf-home") as server:
        yield server


def test_local_files_only_from_the_hub_cache_opens_no_socket(
    hub: HubServer, saved_pipeline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_revision(REPO, saved_pipeline)
    expected = images(Txt2ImgPipeline.from_pretrained(REPO))  # downloads into the cache
    hub.stop()
    with sockets_forbidden() as attempts:
        assert np.array_equal(images(Txt2ImgPipeline.from_pretrained(REPO, local_files_only=True)), expected)
        VAEDecoder.from_pretrained(REPO, subfolder="vae", local_files_only=True)
        TextEncoder.from_pretrained(REPO, subfolder="text_encoder", local_files_only=True)
        with pytest.raises(OSError, match="not in the local Hub cache and downloads are off"):
            Txt2ImgPipeline.from_pretrained("org/never-downloaded", local_files_only=True)
        set_offline(monkeypatch)  # HF_HUB_OFFLINE=1 does the same without the argument
        assert np.array_equal(images(Txt2ImgPipeline.from_pretrained(REPO)), expected)
    assert attempts == []

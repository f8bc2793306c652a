"""Damaged and hostile model folders: each is one clear error naming the file, nothing outside the folder is
read, no code from the folder runs, and the process stays healthy (docs/reliability.md lists the cases).

tests/test_loading.py covers the plainer faults (missing files, configs of the wrong type, pickle-only weights).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import pickle
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from txt2img import GANGenerator, TextEncoder, Txt2ImgPipeline, VAEDecoder
from txt2img.unet import UNetConfig, UNetGenerator

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def copy(saved_pipeline: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(saved_pipeline, target)
    return target


def header(path: Path) -> tuple[dict, int]:  # type: ignore[type-arg]
    """A safetensors file's JSON header and where its data starts."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), 8 + size


def write_header(path: Path, new_header: dict) -> None:  # type: ignore[type-arg]
    _, start = header(path)
    data = path.read_bytes()
    encoded = json.dumps(new_header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[start:])


def flip_bit(path: Path, byte: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def float_offset(path: Path, key: str, index: int = 0) -> int:
    """The file offset of element ``index`` of float32 tensor ``key``."""
    meta, start = header(path)
    return start + meta[key]["data_offsets"][0] + 4 * index


def load_error(folder: Path) -> str:
    with pytest.raises((OSError, ValueError)) as info:
        Txt2ImgPipeline.from_pretrained(folder)
    return str(info.value)


def image(folder: Path) -> np.ndarray:
    pipe = Txt2ImgPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(
        pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images
    )


# ---------------------------------------------------------------------------------------------------------
# Safetensors files


@pytest.mark.parametrize(
    "keep", [4, 8, 30, -100, -1], ids=["in-length", "after-length", "in-header", "in-data", "last-byte"]
)
def test_truncated_weights_name_the_file(copy: Path, keep: int) -> None:
    path = copy / "vae" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    message = load_error(copy)
    assert str(path) in message and "Re-download or re-save it" in message


def test_a_header_declaring_more_data_than_the_file_holds(copy: Path) -> None:
    path = copy / "vae" / WEIGHTS
    meta, _ = header(path)
    last = max((k for k in meta if k != "__metadata__"), key=lambda k: meta[k]["data_offsets"][1])
    meta[last]["data_offsets"][1] += 4096
    meta[last]["shape"] = [int(np.prod(meta[last]["shape"])) + 1024]
    write_header(path, meta)
    message = load_error(copy)
    assert str(path) in message and "not a valid safetensors file" in message


def test_a_header_length_beyond_the_file(copy: Path) -> None:
    path = copy / "gan" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    assert str(path) in load_error(copy)


@pytest.mark.parametrize("byte", [0, 3, 7, 9, 20, 60, 120])
def test_bit_flips_in_the_header_are_caught(copy: Path, byte: int) -> None:
    path = copy / "gan" / WEIGHTS
    flip_bit(path, byte, 6)
    try:
        Txt2ImgPipeline.from_pretrained(copy)
    except (OSError, ValueError) as error:
        assert str(path) in str(error)
    else:  # the flip landed where it changes nothing the loader reads (e.g. padding or a metadata value)
        meta, _ = header(path)
        assert all(k == "__metadata__" or "dtype" in v for k, v in meta.items())


def test_a_bit_flip_that_makes_a_weight_nan_or_infinite_is_caught(copy: Path) -> None:
    path = copy / "vae" / WEIGHTS
    offset = float_offset(path, "decoder.conv_in.weight", 5)
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = struct.pack("<f", float("inf"))
    path.write_bytes(bytes(data))
    message = load_error(copy)
    assert str(path) in message and "NaN or infinite values in 1 tensors (decoder.conv_in.weight)" in message


def test_a_bit_flip_that_leaves_a_finite_number_is_not_detected(copy: Path) -> None:
    """Documented limit: safetensors carries no checksum, and a finite weight may be any number."""
    path = copy / "vae" / WEIGHTS
    before = load_file(path)["decoder.conv_in.weight"].flatten()[5].item()
    flip_bit(path, float_offset(path, "decoder.conv_in.weight", 5) + 3, 7)  # the sign bit
    loaded = Txt2ImgPipeline.from_pretrained(copy)
    assert loaded.vae.decoder.conv_in.weight.flatten()[5].item() == -before


# ---------------------------------------------------------------------------------------------------------
# config.json, model_index.json and the tokenizer's files


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("file", "changes", "error", "match"),
    [
        ("gan/config.json", {"channels": [-16, 8]}, ValueError, "do not describe a model that can be built"),
        ("gan/config.json", {"attention": [True]}, ValueError, "'attention' has 1 entries"),
        ("vae/config.json", {"norm_num_groups": 3}, ValueError, "must be divisible by num_groups"),
        ("vae/config.json", {"scaling_factor": float("nan")}, ValueError, "expected a finite number"),
        ("vae/config.json", {"block_out_channels": ...}, OSError, "shape mismatches"),
        ("gan/config.json", {"channels": [10**9, 8]}, OSError, r"file \[16\] vs model \[1000000000\]"),
        (
            "text_encoder/config.json",
            {"hidden_size": "wide"},
            ValueError,
            "key 'hidden_size' has value 'wide'",
        ),
        (
            "text_encoder/config.json",
            {"num_attention_heads": 0},
            ValueError,
            "num_attention_heads=0 must be positive",
        ),
        (
            "text_encoder/config.json",
            {"txt2img": "fast"},
            ValueError,
            "must be an object of txt2img's settings",
        ),
        (
            "text_encoder/config.json",
            {"txt2img": {"max_length": 10**6}},
            ValueError,
            "max_length=1000000, but the text model takes 1 to 16",
        ),
        ("text_encoder/config.json", {"txt2img": {"clip_skip": "2"}}, ValueError, "key 'clip_skip'"),
        ("text_encoder/tokenizer_config.json", None, OSError, "must hold a JSON object"),
        ("text_encoder/tokenizer.json", None, OSError, "is not a valid tokenizer file"),
        ("model_index.json", {"vae": ["txt2img", 5]}, ValueError, "must be \\[library, class\\]"),
        (
            "model_index.json",
            {"gan": ["os", "system"]},
            ValueError,
            "is a os.system, which txt2img cannot load",
        ),
    ],
    ids=[
        "negative-channels",
        "attention-length",
        "groups",
        "nan-literal",
        "missing-key-default",
        "huge-channels",
        "te-wrong-type",
        "te-zero-heads",
        "te-settings-not-object",
        "te-max-length",
        "te-clip-skip-type",
        "tokenizer-config-list",
        "tokenizer-garbage",
        "index-class-type",
        "index-foreign-class",
    ],
)
def test_bad_configs_are_one_error_naming_the_file(copy: Path, file: str, changes, error, match) -> None:
    path = copy / file
    if changes is None:
        path.write_text("[1, 2, 3]" if path.name == "tokenizer_config.json" else "{garbage")
    else:
        edit_json(path, **changes)
    with pytest.raises(error, match=match) as info:
        Txt2ImgPipeline.from_pretrained(copy)
    assert str(path.parent) in str(info.value)


def test_unknown_config_keys_are_ignored_with_a_warning_naming_them(
    copy: Path, saved_pipeline: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = copy / "gan" / "config.json"
    edit_json(path, future_option=[1, 2], _saved_by="a later version")  # "_" keys are metadata: no warning
    with caplog.at_level(logging.WARNING, logger="txt2img"):
        result = image(copy)
    (message,) = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert str(path) in message and "future_option" in message and "_saved_by" not in message
    np.testing.assert_array_equal(result, image(saved_pipeline))


def test_a_key_missing_from_config_json_takes_its_default(copy: Path, saved_pipeline: Path) -> None:
    """Every config key has a default; where the default does not fit the weights, the load fails listing
    the shape mismatches (test_bad_configs_are_one_error_naming_the_file, missing-key-default)."""
    edit_json(copy / "gan" / "config.json", mapping_layers=...)  # the tiny generator's is the default, 2
    np.testing.assert_array_equal(image(copy), image(saved_pipeline))


@pytest.mark.parametrize("name", ["model_index.json", "gan/config.json"])
def test_json_nested_too_deeply(copy: Path, name: str) -> None:
    (copy / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(OSError, match="nested too deeply|must hold a JSON object") as info:
        Txt2ImgPipeline.from_pretrained(copy)
    assert str(copy / name) in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Nothing outside the model folder is read


@pytest.mark.parametrize("subfolder", ["../model", "vae/../../model/vae", "/etc", "..\\vae"])
def test_subfolders_leaving_the_model_are_refused(copy: Path, subfolder: str) -> None:
    with pytest.raises(OSError, match="points outside the model"):
        VAEDecoder.from_pretrained(copy, subfolder=subfolder)


def test_a_component_folder_linking_out_of_the_model_is_refused(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "vae"
    shutil.move(copy / "vae", outside)
    (copy / "vae").symlink_to(outside, target_is_directory=True)
    message = load_error(copy)
    assert f"{copy / 'vae'} is a link leading out of the model folder" in message
    assert str(outside) in message
    with pytest.raises(OSError, match="link leading out"):
        VAEDecoder.from_pretrained(copy, subfolder="vae")


def test_links_inside_the_model_folder_are_followed(copy: Path) -> None:
    (copy / "vae").rename(copy / "vae-v2")
    (copy / "vae").symlink_to("vae-v2", target_is_directory=True)
    assert Txt2ImgPipeline.from_pretrained(copy).vae is not None
    root_link = copy.parent / "current"
    root_link.symlink_to(copy, target_is_directory=True)  # the model folder itself may be a link
    assert Txt2ImgPipeline.from_pretrained(root_link).vae is not None


def test_a_tokenizer_folder_linking_out_is_refused(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere-tokenizer"
    outside.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(copy / "text_encoder" / name, outside / name)
    (copy / "tokenizer").symlink_to(outside, target_is_directory=True)
    assert "tokenizer is a link leading out of the model folder" in load_error(copy)


def test_a_scheduler_folder_linking_out_is_refused(tmp_path: Path) -> None:
    """A UNet's sampler may come from the diffusers layout's scheduler/ folder beside it: inside the model only."""
    config = UNetConfig(
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        sample_size=8,
    )
    unet = UNetGenerator(config)
    model = tmp_path / "model"
    unet.save_pretrained(model / "unet")
    outside = tmp_path / "elsewhere-scheduler"
    outside.mkdir()
    (model / "unet" / "scheduler_config.json").rename(outside / "scheduler_config.json")
    (model / "scheduler").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OSError, match="scheduler is a link leading out of the model folder") as info:
        GANGenerator.from_pretrained(model, subfolder="unet")
    assert str(outside) in str(info.value)
    (model / "scheduler").unlink()
    shutil.copytree(outside, model / "scheduler")  # the same folder inside the model loads
    assert GANGenerator.from_pretrained(model, subfolder="unet").scheduler == unet.scheduler


@pytest.mark.parametrize(
    "shard", ["../gan/diffusion_pytorch_model.safetensors", "/etc/hostname", "sub/shard.safetensors"]
)
def test_shard_index_naming_files_outside_is_refused(copy: Path, shard: str) -> None:
    (copy / "vae" / WEIGHTS).unlink()
    index = copy / "vae" / f"{WEIGHTS}.index.json"
    index.write_text(json.dumps({"weight_map": {"decoder.conv_in.weight": shard}}))
    message = load_error(copy)
    assert str(index) in message and "outside its folder" in message


# ---------------------------------------------------------------------------------------------------------
# No code from a model folder runs


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize(
    "name", ["diffusion_pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl"]
)
def test_pickle_weights_of_every_kind_are_refused_without_unpickling(
    copy: Path, tmp_path: Path, name: str
) -> None:
    marker = tmp_path / "code-ran"
    (copy / "vae" / WEIGHTS).unlink()
    (copy / "vae" / name).write_bytes(pickle.dumps(RunsCodeWhenUnpickled(marker)))
    message = load_error(copy)
    assert f"only pickle weights ({name})" in message and str(copy / "vae") in message
    assert not marker.exists()


EVIL = """import pathlib
pathlib.Path({marker!r}).touch()
"""


def no_stdin(*args: object) -> str:
    raise AssertionError("loading asked a question on stdin")


def test_a_text_encoder_asking_for_its_own_code_is_refused_without_running_it(
    copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builtins, "input", no_stdin)
    marker = tmp_path / "code-ran"
    folder = copy / "text_encoder"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    edit_json(
        folder / "config.json",
        model_type="evil",
        architectures=["EvilModel"],
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
    )
    with pytest.raises(
        OSError, match="asks for the folder's own code \\(auto_map\\), which txt2img never runs"
    ) as info:
        Txt2ImgPipeline.from_pretrained(copy)
    assert str(folder / "config.json") in str(info.value)
    assert not marker.exists()


def test_a_tokenizer_asking_for_its_own_code_is_refused_without_running_it(
    copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builtins, "input", no_stdin)
    marker = tmp_path / "code-ran"
    folder = copy / "text_encoder"
    (folder / "tokenizer.json").unlink()  # the older files: loaded through transformers' AutoTokenizer
    (folder / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a</w>": 1}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    edit_json(
        folder / "tokenizer_config.json",
        tokenizer_class="EvilTokenizer",
        auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]},
    )
    with pytest.raises(OSError, match="tokenizer") as info:
        Txt2ImgPipeline.from_pretrained(copy)
    assert str(folder) in str(info.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# The process stays healthy


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_after_every_fault_the_process_is_healthy(saved_pipeline: Path, tmp_path: Path) -> None:
    faults = {
        "vae/" + WEIGHTS: lambda p: p.write_bytes(p.read_bytes()[:100]),
        "gan/" + WEIGHTS: lambda p: p.write_bytes(b"\xff" * 64),
        "gan/config.json": lambda p: p.write_text("{"),
        "text_encoder/model.safetensors": lambda p: p.write_bytes(p.read_bytes()[:-8]),
        "text_encoder/tokenizer.json": lambda p: p.write_text("[]"),
        "model_index.json": lambda p: p.write_text("null"),
    }
    reference = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    reference.set_progress_bar_config(disable=True)
    expected = reference("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images
    files, threads = open_files(), threading.active_count()
    for i, (name, damage) in enumerate(faults.items()):
        broken = tmp_path / f"broken-{i}"
        shutil.copytree(saved_pipeline, broken)
        damage(broken / name)
        for _ in range(3):
            assert str(broken / name) in load_error(broken)
    assert open_files() <= files  # nothing left open by the failed loads
    assert threading.active_count() == threads
    again = Txt2ImgPipeline.from_pretrained(saved_pipeline)
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(
        again("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images, expected
    )


def test_component_classes_load_damaged_folders_with_the_same_errors(copy: Path) -> None:
    (copy / "gan" / WEIGHTS).write_bytes(b"")
    with pytest.raises(OSError, match="not a valid safetensors file"):
        GANGenerator.from_pretrained(copy / "gan")
    (copy / "text_encoder" / "config.json").write_text(
        '{"model_type": "clip_text_model", "intermediate_size": -1}'
    )
    with pytest.raises(ValueError, match="do not describe a model"):
        TextEncoder.from_pretrained(copy / "text_encoder")

"""Loading rules: safetensors only, strict keys and shapes, one clear error naming the path for each fault."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny import make_gan, make_vae
from txt2img import GANGenerator, TextEncoder, Txt2ImgPipeline, VAEDecoder


@pytest.fixture
def copy(saved_pipeline: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(saved_pipeline, target)
    return target


class _RunsCodeWhenUnpickled:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_folder_is_refused_without_unpickling(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    payload = _RunsCodeWhenUnpickled()
    payload.marker = marker
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    (copy / "vae" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(payload))
    with pytest.raises(
        OSError, match=r"only pickle weights \(diffusion_pytorch_model.bin\).*save_file"
    ) as info:
        Txt2ImgPipeline.from_pretrained(copy)
    assert str(copy / "vae") in str(info.value)
    assert not marker.exists()


def test_missing_config_json_names_the_path(copy: Path) -> None:
    (copy / "gan" / "config.json").unlink()
    with pytest.raises(OSError, match="config.json does not exist") as info:
        Txt2ImgPipeline.from_pretrained(copy)
    assert str(copy / "gan" / "config.json") in str(info.value)


def test_config_json_that_is_not_json(copy: Path) -> None:
    (copy / "vae" / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="is not valid JSON"):
        VAEDecoder.from_pretrained(copy, subfolder="vae")


def test_config_with_wrong_types_or_missing_keys(copy: Path) -> None:
    path = copy / "gan" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "channels": "many"}))
    with pytest.raises(ValueError, match="key 'channels'") as info:
        GANGenerator.from_pretrained(copy, subfolder="gan")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_is_a_clear_error(copy: Path, damage: str) -> None:
    path = copy / "gan" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00\x01garbage" * 100, "empty": b""}[damage]
    )
    with pytest.raises(OSError, match="not a valid safetensors file|corrupt") as info:
        Txt2ImgPipeline.from_pretrained(copy)
    assert str(path) in str(info.value)


def test_key_and_shape_differences_are_reported_together(tmp_path: Path) -> None:
    gan = make_gan()
    gan.save_pretrained(tmp_path / "gan")
    path = tmp_path / "gan" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state.pop("const")
    state["extra.weight"] = torch.zeros(2)
    state["to_latent.bias"] = torch.zeros(5)
    save_file(state, path)
    with pytest.raises(OSError) as info:
        GANGenerator.from_pretrained(tmp_path / "gan")
    message = str(info.value)
    assert str(path) in message
    assert "1 missing keys: const" in message
    assert "1 unexpected keys: extra.weight" in message
    assert "1 shape mismatches: to_latent.bias: file [5] vs model [4]" in message


def test_sharded_weights_load(tmp_path: Path) -> None:
    vae = make_vae()
    folder = tmp_path / "vae"
    folder.mkdir()
    vae.config.save(folder, "VAEDecoder")
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    keys = sorted(state)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, folder / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    loaded = VAEDecoder.from_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_folder_of_another_class_is_refused(copy: Path) -> None:
    with pytest.raises(
        ValueError, match="describes a 'VAEDecoder', which GANGenerator.from_pretrained cannot load"
    ):
        GANGenerator.from_pretrained(copy, subfolder="vae")


def test_unknown_component_class_names_model_index(copy: Path) -> None:
    path = copy / "model_index.json"
    index = json.loads(path.read_text())
    path.write_text(json.dumps({**index, "gan": ["txt2img", "MysteryNet"]}))
    with pytest.raises(ValueError, match="MysteryNet, which txt2img cannot load") as info:
        Txt2ImgPipeline.from_pretrained(copy)
    assert str(path) in str(info.value)


def test_missing_component_folder(copy: Path) -> None:
    shutil.rmtree(copy / "vae")
    with pytest.raises(OSError, match="has no folder 'vae'"):
        Txt2ImgPipeline.from_pretrained(copy)


def test_component_missing_from_model_index(copy: Path) -> None:
    path = copy / "model_index.json"
    index = json.loads(path.read_text())
    del index["vae"]
    path.write_text(json.dumps(index))
    with pytest.raises(OSError, match="lists no 'vae' component"):
        Txt2ImgPipeline.from_pretrained(copy)


def test_missing_model_index(copy: Path) -> None:
    (copy / "model_index.json").unlink()
    with pytest.raises(OSError, match="model_index.json does not exist"):
        Txt2ImgPipeline.from_pretrained(copy)


def test_path_that_is_neither_folder_nor_repo_id(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="neither a local folder nor a Hugging Face Hub repo id"):
        Txt2ImgPipeline.from_pretrained(str(tmp_path / "no" / "such" / "model"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OSError, match="is a file, not a model folder"):
        Txt2ImgPipeline.from_pretrained(tmp_path / "file.txt")


def test_text_encoder_with_corrupt_weights(copy: Path) -> None:
    (copy / "text_encoder" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(OSError, match="text_encoder"):
        TextEncoder.from_pretrained(copy, subfolder="text_encoder")


def test_text_encoder_with_wrong_shapes(copy: Path) -> None:
    path = copy / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(OSError, match="text_encoder"):
        TextEncoder.from_pretrained(copy, subfolder="text_encoder")


def test_text_encoder_with_pickle_only_weights(copy: Path) -> None:
    (copy / "text_encoder" / "model.safetensors").unlink()
    (copy / "text_encoder" / "pytorch_model.bin").write_bytes(b"not to be read")
    with pytest.raises(OSError, match="only pickle weights"):
        TextEncoder.from_pretrained(copy, subfolder="text_encoder")


def test_text_encoder_without_tokenizer(copy: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / "text_encoder" / name).unlink()
    with pytest.raises(OSError, match="No tokenizer found"):
        TextEncoder.from_pretrained(copy, subfolder="text_encoder")


def test_unknown_text_architecture(copy: Path) -> None:
    path = copy / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "architectures": ["NoSuchModel"], "model_type": "no-such-model"}))
    with pytest.raises(OSError, match="no-such-model|NoSuchModel") as info:
        TextEncoder.from_pretrained(copy, subfolder="text_encoder")
    assert "text_encoder" in str(info.value)


@pytest.mark.parametrize(
    ("index", "error", "message"),
    [
        (
            {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
            ValueError,
            "StableDiffusionXLPipeline, which txt2img cannot run",
        ),
        (
            {
                "_class_name": "StableDiffusionPipeline",
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
            },
            OSError,
            "lists no 'unet' component",
        ),
    ],
    ids=["sdxl", "diffusers-without-unet"],
)
def test_diffusers_pipelines_txt2img_cannot_run_are_refused_by_name(
    tmp_path: Path,
    index: dict,  # type: ignore[type-arg]
    error: type,
    message: str,
) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(error, match=message):
        Txt2ImgPipeline.from_pretrained(tmp_path)

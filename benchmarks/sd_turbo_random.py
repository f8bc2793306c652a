"""A pipeline of SD-Turbo's architecture and sizes with random weights, for benchmarks that need real sizes
without a download: the SD 2.1 UNet (865 M parameters), the SD VAE decoder and the SD 2 text encoder
(OpenCLIP ViT-H text tower, 23 layers). Weights are small random normals, so images are noise, but every
tensor has its real shape and every operation its real cost.

    from sd_turbo_random import sd_turbo_random
    folder = sd_turbo_random()          # built once, then reused from the cache folder
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from torch import nn

from txt2img import TextEncoder, Txt2ImgPipeline, UNetGenerator, VAEDecoder
from txt2img.clip_text import CLIPTextConfig, CLIPTextModel
from txt2img.tokenizer import Tokenizer
from txt2img.unet import UNetConfig
from txt2img.vae import VAEConfig

CACHE = Path(tempfile.gettempdir()) / "txt2img-bench"
SD21_UNET = UNetConfig(
    sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
)
SD_VAE = VAEConfig(sample_size=512)  # the defaults are the Stable Diffusion VAE
SD2_TEXT = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    max_position_embeddings=77,
    hidden_act="gelu",
    eos_token_id=1,  # the ids of char_tokenizer's special tokens
    bos_token_id=0,
    pad_token_id=1,
)


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Materialise a meta-built module with random weights quickly: normal(0, 0.02) for matrices and kernels,
    norms at (1, 0), biases at 0."""
    generator = torch.Generator().manual_seed(seed)
    module.to_empty(device="cpu")
    for name, tensor in module.state_dict().items():
        with torch.no_grad():
            if tensor.dim() >= 2:
                tensor.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("weight"):
                tensor.fill_(1.0)
            else:
                tensor.zero_()
    return module.eval()


def char_tokenizer(folder: Path) -> Tokenizer:
    """A CLIP BPE tokenizer of single characters (no download): every word tokenizes letter by letter."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    return Tokenizer.from_folder(folder, 77, 77)


def sd_turbo_random(cache: Path = CACHE) -> Path:
    """The pipeline folder (txt2img layout, float32), built on first use."""
    folder = cache / "sd-turbo-random"
    if (folder / "model_index.json").is_file():
        return folder
    with torch.device("meta"):
        unet = UNetGenerator(SD21_UNET)
        vae = VAEDecoder(SD_VAE)
        text = CLIPTextModel(SD2_TEXT)
    pipe = Txt2ImgPipeline(
        TextEncoder(char_tokenizer(cache / "tokenizer"), randomize(text, 0)),
        randomize(unet, 1),  # type: ignore[arg-type]
        randomize(vae, 2),  # type: ignore[arg-type]
    )
    pipe.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(sd_turbo_random())

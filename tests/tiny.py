"""Tiny txt2img components with seeded random weights, built locally (no Hub access in tests)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from txt2img import GANConfig, GANGenerator, TextEncoder, Txt2ImgPipeline, VAEConfig, VAEDecoder

MAX_LENGTH = 16


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary of single characters (with and without ``</w>``) and an empty merge list:
    every lowercase word tokenizes character by character."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def make_text_encoder(folder: Path, seed: int = 0) -> TextEncoder:
    from transformers import CLIPTokenizer

    from txt2img.clip_text import CLIPTextConfig, CLIPTextModel

    vocab, merges = write_clip_vocab(folder)
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return TextEncoder(tokenizer, CLIPTextModel(config)).eval()


def vae_config() -> VAEConfig:
    return VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32)


def gan_config() -> GANConfig:
    return GANConfig(
        z_dim=8,
        w_dim=16,
        text_dim=32,
        pooled_dim=32,
        channels=(16, 8),
        attention=(True, False),
        attention_heads=2,
        const_size=8,
    )


def make_vae(seed: int = 0) -> VAEDecoder:
    torch.manual_seed(seed)
    return VAEDecoder(vae_config()).eval()


def make_gan(seed: int = 0) -> GANGenerator:
    torch.manual_seed(seed)
    return GANGenerator(gan_config()).eval()


def make_pipeline(folder: Path, seed: int = 0) -> Txt2ImgPipeline:
    """A pipeline of 32 × 32 images (latents 16 × 16, size factor 4), its weights stored channels-last as
    ``Txt2ImgPipeline.from_pretrained`` stores them, so that loaded copies compute bit for bit the same."""
    pipe = Txt2ImgPipeline(make_text_encoder(folder / "vocab", seed), make_gan(seed), make_vae(seed))
    pipe.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe

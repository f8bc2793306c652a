"""The text encoder of a model trained here: a small ``CLIPTextModel`` with a word-level tokenizer, trained
with the CLIP objective (Radford et al. 2021) against a small encoder of *latent* images, then frozen.

Training against latents rather than pixels keeps it cheap and gives the GAN trainer a text–latent
similarity it can use as an extra loss (GigaGAN's CLIP loss, in latent space).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from txt2img import distributed
from txt2img.clip_text import CLIPTextConfig, CLIPTextModel
from txt2img.text_encoder import TextEncoder, TextEncoderConfig
from txt2img.tokenizer import Tokenizer

SPECIAL_TOKENS = (
    "[PAD]",
    "[UNK]",
    "[BOS]",
    "[EOS]",
)  # [EOS] must not get id 2: CLIP treats that id as legacy


def _word_splitting() -> tuple[Any, Any]:
    """The word-level tokenizer's normalizer (NFKC, lower case) and pre-tokenizer (words and runs of
    punctuation, as ``\\w+|[^\\w\\s]+``)."""
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]), pre_tokenizers.Whitespace()


@functools.cache
def _word_splitter() -> tuple[Any, Any]:
    """One ``_word_splitting`` pair for ``split_words``, which runs once per caption of a data set."""
    return _word_splitting()


def split_words(text: str) -> list[str]:
    """The words of ``text`` as the word-level tokenizer splits them, one token each:
    ``"A red circle."`` → ``["a", "red", "circle", "."]``."""
    normalizer, pre_tokenizer = _word_splitter()
    return [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


def build_word_tokenizer(words: Iterable[str], max_length: int) -> Tokenizer:
    """A word-level tokenizer (``split_words``) with BOS/EOS and padding, saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted({w.lower() for w in words}):
        vocab.setdefault(word, len(vocab))
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = _word_splitting()
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    config = {
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "model_max_length": max_length,
    }
    return Tokenizer(backend, max_length, config)


def vocab_id(tokenizer: Tokenizer, role: str) -> int:
    """The id of the special token with ``role`` (``"pad_token"``…), which ``build_word_tokenizer`` always sets."""
    token = tokenizer.token_id(role)
    if token is None:
        raise ValueError(f"The tokenizer has no {role}: build it with build_word_tokenizer.")
    return token


@dataclasses.dataclass
class TextEncoderShape:
    """Args:
    hidden_size: Width of the transformer.
    layers: Transformer layers.
    heads: Attention heads.
    max_length: Tokens per prompt, BOS and EOS included.
    """

    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    max_length: int = 20


def build_text_encoder(words: Iterable[str], shape: TextEncoderShape, seed: int = 0) -> TextEncoder:
    """A freshly initialised CLIP text encoder with a word-level tokenizer over ``words``."""
    tokenizer = build_word_tokenizer(words, shape.max_length)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.hidden_size * 4,
        num_attention_heads=shape.heads,
        num_hidden_layers=shape.layers,
        max_position_embeddings=shape.max_length,
        pad_token_id=vocab_id(tokenizer, "pad_token"),
        bos_token_id=vocab_id(tokenizer, "bos_token"),
        eos_token_id=vocab_id(tokenizer, "eos_token"),
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return TextEncoder(tokenizer, CLIPTextModel(config), TextEncoderConfig(max_length=shape.max_length))


class LatentImageEncoder(nn.Module):
    """Latents (B, C, size, size) → embeddings (B, dim): three stride-2 convolutions and a linear head."""

    def __init__(self, latent_channels: int, dim: int, size: int = 16, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width * 2, width * 2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width * 2, width * 4, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(width * 4 * (-(-size // 8)) ** 2, dim),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


class LatentCLIP(nn.Module):
    """The text encoder's pooled vector and a latent-image encoder, projected into one space of ``dim``."""

    def __init__(
        self, text_encoder: TextEncoder, latent_channels: int, latent_size: int = 16, dim: int = 128
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_encoder.hidden_size, dim, bias=False)
        self.image_encoder = LatentImageEncoder(latent_channels, dim, latent_size)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP

    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        """(B,) prompts → unit vectors (B, dim)."""
        return F.normalize(self.text_projection(self.text_encoder.encode(prompts).pooled), dim=-1)

    def embed_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) → unit vectors (B, dim)."""
        return F.normalize(self.image_encoder(latents), dim=-1)


def same_captions(captions: list[str]) -> torch.Tensor:
    """(B, B) True where two captions of the batch are identical."""
    return torch.tensor([[a == b for b in captions] for a in captions])


def contrastive_loss(
    text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor, same: torch.Tensor | None = None
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of matching (text, image) unit vectors (B, D).

    ``same`` (B, B) marks pairs whose captions are identical: they are not counted as negatives.
    """
    logits = logit_scale.exp().clamp(max=100) * text @ image.t()
    if same is not None:
        logits = logits.masked_fill(same & ~torch.eye(len(text), dtype=torch.bool), float("-inf"))
    target = torch.arange(len(text))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@dataclasses.dataclass
class CLIPTrainingConfig:
    """Args:
    steps: Optimizer steps.
    lr: AdamW learning rate (cosine-decayed to 10%).
    word_weight: Weight of an extra text-only loss: a linear head must tell from the pooled vector which
        words the caption holds (a bag of words, binary cross-entropy). It makes each word readable from
        the pooled vector on its own, also in word combinations training never showed.
    """

    steps: int = 1500
    lr: float = 1e-3
    word_weight: float = 0.0


class WordHead(nn.Module):
    """Pooled text vectors (B, hidden) → one logit per vocabulary word (B, V): whether the caption holds it."""

    def __init__(self, text_encoder: TextEncoder) -> None:
        super().__init__()
        tokenizer = text_encoder.tokenizer
        self.linear = nn.Linear(text_encoder.hidden_size, len(tokenizer))
        self.special = [vocab_id(tokenizer, role) for role in ("pad_token", "bos_token", "eos_token")]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled)

    def targets(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask → (B, V) float 1 for each word the caption holds, special tokens 0."""
        words = torch.zeros(input_ids.shape[0], self.linear.out_features)
        words.scatter_add_(1, input_ids, mask.to(words.dtype))  # padding adds 0
        words[:, self.special] = 0.0
        return words.clamp(max=1.0)


def clip_loss(
    clip: LatentCLIP,
    latents: torch.Tensor,
    captions: list[str],
    word_head: WordHead | None = None,
    word_weight: float = 0.0,
) -> torch.Tensor:
    """The contrastive loss of one batch of (latents, captions) pairs; identical captions are not negatives.

    Args:
        clip: The encoders.
        latents: Scaled latents (B, C, h, w).
        captions: Their captions.
        word_head: With ``word_weight`` > 0, adds its bag-of-words loss on the captions' pooled vectors.
        word_weight: Weight of that loss.

    Returns:
        The scalar loss.
    """
    pooled = clip.text_encoder.encode(captions).pooled
    loss = contrastive_loss(
        F.normalize(clip.text_projection(pooled), dim=-1),
        clip.embed_latents(latents),
        clip.logit_scale,
        same_captions(captions),
    )
    if word_head is not None and word_weight > 0:
        targets = word_head.targets(*clip.text_encoder.tokenize(captions))
        loss = loss + word_weight * F.binary_cross_entropy_with_logits(word_head(pooled), targets)
    return loss


def train_latent_clip(
    clip: LatentCLIP,
    training: CLIPTrainingConfig,
    batches: Iterator[tuple[torch.Tensor, list[str]]],
    *,
    seed: int = 0,
    progress: bool = True,
) -> LatentCLIP:
    """Train text and latent-image encoders contrastively on (latents (B, C, h, w), captions) batches.

    Under ``torchrun`` each process trains on its own ``batches`` (negatives come from its own batch) and
    gradients are averaged by DistributedDataParallel.

    Args:
        clip: The encoders to train.
        training: Steps, learning rate and the word loss's weight.
        batches: An endless iterator of (scaled latents, captions).
        seed: Seed of the initial draws.
        progress: Show a tqdm bar with the loss.

    Returns:
        ``clip``, trained, in eval mode with gradients off.
    """
    torch.manual_seed(distributed.rank_seed(seed))
    clip.train()
    word_head = WordHead(clip.text_encoder) if training.word_weight > 0 else None
    modules = [clip] if word_head is None else [clip, word_head]
    optimizer = torch.optim.AdamW(
        [p for module in modules for p in module.parameters()], lr=training.lr, weight_decay=0.01
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, training.steps, eta_min=training.lr * 0.1
    )
    run = distributed.data_parallel(*modules)  # a plain call in one process
    bar = tqdm(
        range(training.steps),
        desc="text encoder (CLIP)",
        disable=not progress or not distributed.is_main_process(),
    )
    for _ in bar:
        latents, captions = next(batches)
        loss = run(clip_loss, clip, latents, captions, word_head, training.word_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return clip.eval().requires_grad_(False)

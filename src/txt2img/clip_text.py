"""CLIP's text transformer (Radford et al. 2021), txt2img's own implementation.

It computes exactly what transformers' ``CLIPTextModel`` computes (a test compares them) with the same
parameter names, and reads and writes the same ``config.json`` and ``model.safetensors``. txt2img runs CLIP
text towers on it because importing transformers' modelling code alone takes about 2 s, longer than a whole
generation with the embedded model. Checkpoints in the diffusers layout (keys under ``text_model.``) load
through an explicit prefix map.

Shapes: input ids (B, L) → hidden states (B, L, D); the pooled vector (B, D) is the final-normed hidden
state at the first end-of-text token.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from txt2img.linear import Linear
from txt2img.modeling import (
    ModelConfig,
    build_on_meta,
    load_state_dict_strict,
    save_state_dict,
    weight_files,
)
from txt2img.placement import resolve_dtype

WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_PREFIX = "text_model."  # older transformers and diffusers checkpoints nest the tower under it


@dataclasses.dataclass
class CLIPTextConfig(ModelConfig):
    """The fields of transformers' ``CLIPTextConfig`` that the text tower uses (names and defaults kept).

    Args:
        vocab_size: Tokens in the vocabulary.
        hidden_size: Width D.
        intermediate_size: Width of the MLP.
        num_attention_heads: Heads per layer.
        num_hidden_layers: Layers.
        max_position_embeddings: Longest input L.
        hidden_act: ``"quick_gelu"`` (OpenAI CLIP) or ``"gelu"`` (OpenCLIP).
        layer_norm_eps: LayerNorm epsilon.
        eos_token_id: End-of-text token; the pooled vector is taken at its first occurrence
            (at the largest token id when it is 2, as transformers does for old configs).
        bos_token_id: Start-of-text token.
        pad_token_id: Padding token.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    bos_token_id: int = 49406
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        heads, width = self.num_attention_heads, self.hidden_size
        if heads < 1 or width % heads:
            raise ValueError(f"num_attention_heads={heads} must be positive and divide hidden_size={width}.")

    @classmethod
    def from_transformers_dict(cls, data: dict[str, Any], source: str) -> CLIPTextConfig:
        """Read the fields it needs from a transformers ``config.json`` (other keys are transformers' own)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in data.items() if k in names}, source=source)

    def to_transformers_dict(self) -> dict[str, Any]:
        """A ``config.json`` that transformers' ``CLIPTextModel.from_pretrained`` also reads."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **self.to_dict()}


@dataclasses.dataclass
class CLIPTextOutput:
    """Attributes named as transformers' ``BaseModelOutputWithPooling``.

    Attributes:
        last_hidden_state: (B, L, D), after the final LayerNorm.
        pooler_output: (B, D), at the end-of-text token.
        hidden_states: The embeddings and each layer's output, before the final LayerNorm (when asked for).
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · σ(1.702 x), the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D) + (L, D)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.q_proj = Linear(config.hidden_size, config.hidden_size)
        self.k_proj = Linear(config.hidden_size, config.hidden_size)
        self.v_proj = Linear(config.hidden_size, config.hidden_size)
        self.out_proj = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            proj(x).view(b, n, self.heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, L, d/h)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.activation = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPTextModel(nn.Module):
    """CLIP's text tower.

    Args:
        config: Its shape; the same fields as transformers' ``CLIPTextConfig``.
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        """Encode token ids (B, L); ``attention_mask`` (B, L) hides padding on top of the causal mask."""
        x = self.embeddings(input_ids)  # (B, L, D)
        n = input_ids.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]  # (1, 1, L, L) causal
        if attention_mask is not None:
            mask = mask & attention_mask.to(torch.bool)[:, None, None, :]
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            states.append(x)
        last = self.final_layer_norm(x)
        if self.config.eos_token_id == 2:  # old configs: the end-of-text token has the largest id
            eos = input_ids.to(torch.int).argmax(dim=-1)
        else:
            eos = (input_ids == self.config.eos_token_id).to(torch.int).argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        return CLIPTextOutput(last, pooled, tuple(states) if output_hidden_states else None)

    def save_pretrained(self, folder: Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` as transformers' ``CLIPTextModel`` does."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_transformers_dict(), indent=2) + "\n")
        save_state_dict(self, folder / WEIGHTS_NAME)

    @classmethod
    def from_folder(
        cls, folder: Path, data: dict[str, Any], dtype: torch.dtype | str | None = None
    ) -> CLIPTextModel:
        """Load strictly from ``folder`` (its parsed ``config.json`` is ``data``).

        Raises:
            OSError: missing, corrupt or mismatched weights (all differences listed, naming the file).
        """
        source = str(folder / "config.json")
        config = CLIPTextConfig.from_transformers_dict(data, source=source)
        model = build_on_meta(cls, config, source)
        files = weight_files(folder, WEIGHTS_NAME)
        expected = model.state_dict()
        state = load_state_dict_strict(files, expected, rename=_strip_diffusers_prefix)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(dtype=resolve_dtype(dtype)).eval()


def _strip_diffusers_prefix(key: str) -> str | None:
    """Checkpoint key → model key: drop the ``text_model.`` prefix, and the position ids that old
    transformers versions stored as a buffer (they are ``arange(L)``)."""
    key = key.removeprefix(DIFFUSERS_PREFIX)
    return None if key == "embeddings.position_ids" else key

"""The text encoder: a tokenizer plus a text transformer (CLIP first; any transformers encoder works).

On disk a ``TextEncoder`` is a transformers folder, so ``CLIPTextModel.from_pretrained`` and
``AutoTokenizer.from_pretrained`` read it too: ``config.json`` (the transformers config, with txt2img's own
settings under the key ``"txt2img"``), ``model.safetensors`` and the tokenizer files. The tokenizer may
instead sit in a sibling ``tokenizer/`` folder, as in the diffusers layout.

CLIP text towers (``model_type: clip_text_model``) run on txt2img's own implementation
(``txt2img.clip_text``, equal to transformers' within float tolerance) and ``tokenizer.json`` files are read
with the ``tokenizers`` library, so the common path never imports transformers (about 2 s on its own).
Other encoder architectures load through transformers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from txt2img import hub, offload, precision, saving
from txt2img.clip_text import CLIPTextModel
from txt2img.modeling import CONFIG_NAME, ModelConfig, read_config_json, read_json, weight_files
from txt2img.placement import place, resolve_device, resolve_dtype
from txt2img.tokenizer import Tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

TEXT_WEIGHTS_NAME = "model.safetensors"
CACHE_SIZE = 32  # encoded prompt batches kept by each TextEncoder
LOGGED_DROPPED_CHARS = 200  # of a prompt's truncated text, shown in the warning (a log line stays a line)
NATIVE_MODEL_TYPES = {"clip_text_model": CLIPTextModel}


@dataclasses.dataclass
class TextEncoderConfig(ModelConfig):
    """txt2img's settings of a text encoder (the network's own shape is the transformers config).

    Args:
        max_length: Tokens per prompt, padding included; ``None``: the tokenizer's ``model_max_length``.
        clip_skip: Use the hidden states this many layers before the last (then the final layer norm).
        use_attention_mask: Pass the padding mask to the text model. CLIP models are trained without it
            (their causal mask already hides the padding from the real tokens).
    """

    max_length: int | None = None
    clip_skip: int | None = None
    use_attention_mask: bool = False


@dataclasses.dataclass
class PromptEmbeds:
    """Encoded prompts.

    Attributes:
        hidden_states: (B, L, D) per-token features.
        pooled: (B, D_pooled) one vector per prompt.
        attention_mask: (B, L), 1 for real tokens, 0 for padding.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def repeat_interleave(self, repeats: int) -> PromptEmbeds:
        """Each prompt ``repeats`` times in a row: (B, ...) → (B·repeats, ...)."""
        # Not dataclasses.astuple: it deep-copies every tensor, and fails on tensors that carry gradients.
        return PromptEmbeds(
            self.hidden_states.repeat_interleave(repeats, dim=0),
            self.pooled.repeat_interleave(repeats, dim=0),
            self.attention_mask.repeat_interleave(repeats, dim=0),
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> PromptEmbeds:
        return PromptEmbeds(
            self.hidden_states.to(device, dtype),
            self.pooled.to(device, dtype),
            self.attention_mask.to(device),
        )


def check_prompt_texts(prompts: list[str]) -> None:
    """Refuse prompts that are not valid Unicode text, which the tokenizer cannot read.

    Any string of valid code points is a prompt (empty, emoji, control characters, NUL included). A lone
    surrogate is not: it comes from bytes decoded with ``errors="surrogateescape"`` (e.g. undecodable file names
    or command-line arguments), and is refused with where it is.

    Raises:
        TypeError: a prompt that is not a string.
        ValueError: a prompt holding a lone surrogate.
    """
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise TypeError(f"Prompt {i} is a {type(text).__name__}, not a string.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"Prompt {i} is not valid Unicode: a lone surrogate {text[error.start]!r} at character "
                f"{error.start}. Decode the text as UTF-8 with errors='replace' before passing it."
            ) from error


class TextEncoder(nn.Module):
    """Prompts → token features, a pooled vector and the attention mask.

    Args:
        tokenizer: A :class:`txt2img.tokenizer.Tokenizer`, or a transformers fast tokenizer (wrapped).
        model: A text transformer: txt2img's ``CLIPTextModel`` or a transformers model.
        config: txt2img's settings (maximum length, ``clip_skip``).
    """

    #: txt2img's ``CLIPTextModel`` or a transformers model: both have ``.config`` and ``save_pretrained``.
    model: Any

    def __init__(
        self, tokenizer: Tokenizer | Any, model: nn.Module, config: TextEncoderConfig | None = None
    ) -> None:
        super().__init__()
        self.config = config or TextEncoderConfig()
        if not isinstance(tokenizer, Tokenizer):
            limit = getattr(model.config, "max_position_embeddings", None)
            tokenizer = Tokenizer.from_transformers(tokenizer, self.config.max_length, limit)
        self.tokenizer = tokenizer
        self.model = model
        self._cache: collections.OrderedDict[tuple[Any, ...], PromptEmbeds] = collections.OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        """Where the text model computes (with offloading, the execution device)."""
        return offload.execution_device(self)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the text model computes in (its weights may be stored in a smaller one)."""
        return precision.compute_dtype(self)

    @property
    def max_length(self) -> int:
        """Tokens per prompt, padding included."""
        return self.tokenizer.max_length

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    # -----------------------------------------------------------------------------------------------------
    # Encoding

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize to ``max_length`` (padded, truncated with a warning that shows the dropped text).

        Returns:
            ``(input_ids, attention_mask)``, each (B, max_length) int64.
        """
        check_prompt_texts(prompts)
        input_ids, mask, dropped = self.tokenizer(prompts)
        for i, text in enumerate(dropped):
            if text:
                shown = text if len(text) <= LOGGED_DROPPED_CHARS else text[:LOGGED_DROPPED_CHARS] + "…"
                more = f" ({len(text) - LOGGED_DROPPED_CHARS} more characters)" if shown is not text else ""
                logger.warning(
                    "Prompt %d is longer than the text encoder's %d tokens; this part was dropped: %r%s",
                    i,
                    self.max_length,
                    shown,
                    more,
                )
        return input_ids, mask

    def forward(self, prompts: list[str]) -> PromptEmbeds:
        return self.encode(prompts)

    def encode(self, prompts: str | list[str]) -> PromptEmbeds:
        """Encode prompts.

        Without gradients (as in a pipeline call), the last ``CACHE_SIZE`` results are kept, keyed on the
        token ids, the settings, the device, the dtype and the weights' version counters: prompts encoded
        before cost only their tokenization. The cached tensors are shared: do not modify them in place.

        Args:
            prompts: A prompt or a list of prompts.

        Returns:
            :class:`PromptEmbeds` with ``hidden_states`` (B, L, D), ``pooled`` (B, D) and
            ``attention_mask`` (B, L), on the model's device.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        input_ids, mask = self.tokenize(prompts)
        key = self._cache_key(input_ids, mask) if not torch.is_grad_enabled() else None
        if key is not None:
            with self._cache_lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    return cached
        embeds = self._encode_tokens(input_ids, mask)
        if key is not None:
            with self._cache_lock:
                self._cache[key] = embeds
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return embeds

    def _cache_key(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[Any, ...]:
        # Bumped by every in-place change. Inference tensors (weights an offloader maps in during a call) have
        # no counter; they are re-read from their unchanging files each time.
        versions = sum(t._version for t in self.model.parameters() if not t.is_inference())
        return (
            tuple(input_ids.shape),
            input_ids.numpy().tobytes(),
            mask.numpy().tobytes(),
            self.config.clip_skip,
            self.config.use_attention_mask,
            str(self.device),
            self.dtype,
            versions,
        )

    def _encode_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor) -> PromptEmbeds:
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        skip = self.config.clip_skip
        out = self.model(
            input_ids,
            attention_mask=mask if self.config.use_attention_mask else None,
            output_hidden_states=skip is not None,
        )
        hidden = out.last_hidden_state
        if skip is not None:
            hidden = out.hidden_states[-(skip + 1)]
            final_norm = getattr(getattr(self.model, "text_model", self.model), "final_layer_norm", None)
            if final_norm is not None:
                hidden = final_norm(hidden)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # encoders without a pooler: the mean over the real tokens
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return PromptEmbeds(hidden, pooled, mask)

    # -----------------------------------------------------------------------------------------------------
    # Saving and loading

    @classmethod
    def download_patterns(cls, subfolder: str | None) -> list[str]:
        """The files to fetch from a Hub repo: the text encoder's folder and, as in the diffusers layout,
        a sibling ``tokenizer/`` folder."""
        patterns = hub.component_patterns(subfolder)
        if subfolder:
            patterns += hub.component_patterns(hub.sibling(subfolder, "tokenizer"))
        return patterns

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the text model, the tokenizer and txt2img's settings into one transformers folder, all at once
        (``txt2img.saving``: a save that fails or is interrupted leaves the folder as it was)."""
        with saving.staged_folder(save_directory, marker=CONFIG_NAME) as folder:
            self.model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            config = read_json(folder / CONFIG_NAME)
            config["txt2img"] = {"_class_name": "TextEncoder", **self.config.to_dict()}
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
    ) -> TextEncoder:
        """Load a text encoder from a local folder or a Hub repo.

        Args:
            name_or_path: A local folder or a Hub repo id.
            subfolder: The text encoder's folder inside ``name_or_path``, e.g. ``"text_encoder"``.
            revision: Hub branch, tag or commit sha.
            cache_dir: Hub cache folder.
            local_files_only: Make no network request.
            token: Hub token for private or gated repos.
            dtype: Weight dtype; default ``"auto"`` (float32 on CPUs, half precision on GPUs).
            device: Where to put the model; default CPU.
            torch_dtype: Deprecated name of ``dtype``.

        Returns:
            The text encoder in eval mode.

        Raises:
            OSError: missing or corrupt files, weights that do not match the config.
            ValueError: a config for an unknown architecture.
        """
        dtype = resolve_dtype(dtype, torch_dtype, device)
        folder = hub.resolve_folder(
            name_or_path,
            subfolder=subfolder,
            allow_patterns=cls.download_patterns(subfolder),
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        data = read_config_json(folder)
        source = f"{folder / CONFIG_NAME} (key 'txt2img')"
        settings = data.get("txt2img") or {}
        if not isinstance(settings, dict):
            # A config's values of the wrong type are ValueErrors, like every other config check.
            raise ValueError(f"{source} must be an object of txt2img's settings, not {settings!r}.")  # noqa: TRY004
        settings = {k: v for k, v in settings.items() if k != "_class_name"}
        config = TextEncoderConfig.from_dict(settings, source=source)
        native = NATIVE_MODEL_TYPES.get(str(data.get("model_type")))
        model = native.from_folder(folder, data, dtype) if native else _load_text_model(folder, data, dtype)
        limit = getattr(model.config, "max_position_embeddings", None)
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
        if limit is not None and config.max_length is not None and not 0 < config.max_length <= limit:
            raise ValueError(
                f"{source}: max_length={config.max_length}, but the text model takes 1 to {limit} tokens "
                "(its max_position_embeddings)."
            )
        tokenizer = _load_tokenizer(folder, config.max_length, limit)
        encoder = cls(tokenizer, model, config)
        return place(encoder, resolve_device(device), dtype).eval()  # type: ignore[return-value]


def _model_class(folder: Path, data: dict[str, Any]) -> type[PreTrainedModel]:
    """The transformers class a config names (``architectures``), else ``AutoModel`` by ``model_type``.

    Only classes of the transformers package itself are used: no code from a model folder is run.
    """
    import transformers

    architectures = data.get("architectures") or []
    for name in architectures:
        candidate = getattr(transformers, str(name), None)
        if isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedModel):
            return candidate
    model_type = data.get("model_type")
    if model_type is None:
        raise ValueError(
            f"{folder / CONFIG_NAME} names no transformers architecture ('architectures' or 'model_type'): "
            "a text encoder folder holds a transformers text model."
        )
    if str(model_type) not in transformers.CONFIG_MAPPING:
        own_code = (
            " and asks for the folder's own code (auto_map), which txt2img never runs"
            if "auto_map" in data
            else ""
        )
        raise OSError(
            f"{folder / CONFIG_NAME} names the architecture {model_type!r}, which transformers does not have"
            f"{own_code}. Use a text encoder of an architecture transformers has built in (such as CLIP)."
        )
    return transformers.AutoModel  # type: ignore[return-value]


def _load_text_model(folder: Path, data: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    """Load the transformers model strictly: missing, unexpected or mis-shaped weights are an error."""
    from safetensors import SafetensorError

    model_class = _model_class(folder, data)
    files = weight_files(folder, TEXT_WEIGHTS_NAME)
    try:
        model, info = cast(
            "tuple[PreTrainedModel, dict[str, Any]]",
            model_class.from_pretrained(
                folder,
                dtype=dtype,
                use_safetensors=True,
                local_files_only=True,
                output_loading_info=True,
                trust_remote_code=False,  # never run a model folder's code, nor ask on stdin whether to
            ),
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise OSError(f"Could not load the text model in {folder}: {error}") from error
    problems = {
        k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    problems["error_msgs"] = list(info.get("error_msgs") or [])
    if any(problems.values()):
        details = "; ".join(f"{k}: {v[:10]}" for k, v in problems.items() if v)
        raise OSError(
            f"The weights in {', '.join(map(str, files))} do not match {folder / CONFIG_NAME}: {details}."
        )
    return model


def _load_tokenizer(folder: Path, max_length: int | None, limit: int | None) -> Tokenizer:
    """The tokenizer in ``folder`` or, as in the diffusers layout, in the sibling ``tokenizer/`` folder."""
    if Tokenizer.holds_tokenizer(folder):
        return Tokenizer.from_folder(folder, max_length, limit)
    sibling = hub.subfolder_of(folder.parent, "tokenizer")
    if Tokenizer.holds_tokenizer(sibling):
        return Tokenizer.from_folder(sibling, max_length, limit)
    raise OSError(
        f"No tokenizer found in {folder} or {folder.parent / 'tokenizer'}: expected tokenizer.json "
        "(or vocab.json and merges.txt)."
    )

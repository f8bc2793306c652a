"""Prompts → padded token ids, through the Rust ``tokenizers`` library that every fast Hugging Face
tokenizer runs on.

A ``tokenizer.json`` is read directly (no transformers import, which alone costs about 2 s); a folder with only
the older files (``vocab.json`` + ``merges.txt``, ``spiece.model``, ...) is converted once through
transformers' ``AutoTokenizer``. Padding and truncation are fixed when the tokenizer is made and never
changed afterwards, so one tokenizer can serve many threads at once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import tokenizers

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
LEGACY_FILES = ("vocab.json", "spiece.model", "vocab.txt", "sentencepiece.bpe.model")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _dropped_text(prompt: str, encoding: tokenizers.Encoding) -> str:
    """The end of ``prompt`` that truncation cut off, as the user wrote it (decoding the overflowing ids
    instead would show unknown words as the unknown token)."""
    if not encoding.overflowing:
        return ""
    kept_end = max((end for _, end in encoding.offsets), default=0)  # added start/end/pad tokens: (0, 0)
    return prompt[kept_end:].strip()


def _token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A fixed-length tokenizer.

    Args:
        backend: The ``tokenizers.Tokenizer`` (its post-processor adds start/end tokens).
        max_length: Tokens per prompt, special tokens and padding included.
        config: ``tokenizer_config.json`` values to keep (special tokens, ``model_max_length``, class).
    """

    def __init__(
        self, backend: tokenizers.Tokenizer, max_length: int, config: dict[str, Any] | None = None
    ) -> None:
        import tokenizers

        self.config = dict(config or {})
        self.max_length = max_length
        self.backend = tokenizers.Tokenizer.from_str(
            backend.to_str()
        )  # a private copy: its settings are ours
        pad = _token_text(self.config.get("pad_token")) or _token_text(self.config.get("eos_token"))
        pad_id = self.backend.token_to_id(pad) if pad is not None else None
        if pad_id is None:
            raise ValueError(
                f"The tokenizer has no padding token ({pad!r}): set 'pad_token' in its tokenizer_config.json."
            )
        self.backend.enable_truncation(max_length)
        self.backend.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int | None:
        """The id of a special token by its role (``"bos_token"``, ``"eos_token"``, ``"pad_token"``, ``"unk_token"``)."""
        text = _token_text(self.config.get(name))
        return None if text is None else self.backend.token_to_id(text)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Tokenize to ``max_length``.

        Returns:
            ``(input_ids, attention_mask, dropped)``: (B, max_length) int64 tensors, and per prompt the text
            cut off by truncation (empty when it fitted).
        """
        encodings = self.backend.encode_batch(prompts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        dropped = [_dropped_text(prompt, e) for prompt, e in zip(prompts, encodings)]
        return ids, mask, dropped

    # -----------------------------------------------------------------------------------------------------
    # Files

    def save_pretrained(self, folder: Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (which transformers' AutoTokenizer also reads)."""
        import tokenizers

        folder.mkdir(parents=True, exist_ok=True)
        plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
        plain.no_padding()
        plain.no_truncation()
        plain.save(str(folder / TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @staticmethod
    def holds_tokenizer(folder: Path) -> bool:
        return any((folder / name).is_file() for name in (TOKENIZER_FILE, *LEGACY_FILES))

    @classmethod
    def from_folder(cls, folder: Path, max_length: int | None = None, limit: int | None = None) -> Tokenizer:
        """Load the tokenizer in ``folder``.

        Args:
            folder: Holds ``tokenizer.json`` (read directly) or older tokenizer files (converted through
                transformers).
            max_length: Tokens per prompt; default ``model_max_length`` from ``tokenizer_config.json``.
            limit: The most tokens the text model takes (its ``max_position_embeddings``), which the default
                never exceeds.

        Raises:
            OSError: no tokenizer, or files it cannot read.
        """
        config: dict[str, Any] = {}
        config_path = folder / TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
                raise OSError(f"{config_path} is not valid JSON ({error}).") from error
            if not isinstance(config, dict):
                raise OSError(f"{config_path} must hold a JSON object, not {type(config).__name__}.")
        if (folder / TOKENIZER_FILE).is_file():
            import tokenizers

            try:
                backend = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE))
            except Exception as error:  # the Rust library raises its own exception type
                raise OSError(
                    f"{folder / TOKENIZER_FILE} is not a valid tokenizer file ({error})."
                ) from error
        elif any((folder / name).is_file() for name in LEGACY_FILES):
            backend, config = _convert_with_transformers(folder, config)
        else:
            raise OSError(
                f"No tokenizer in {folder}: expected tokenizer.json (or vocab.json and merges.txt)."
            )
        config = {k: v for k, v in config.items() if k in (*SPECIAL_TOKEN_KEYS, "model_max_length")}
        try:
            return cls(backend, _length(max_length, config.get("model_max_length"), limit), config)
        except ValueError as error:
            raise OSError(f"The tokenizer in {folder} cannot pad: {error}") from error

    @classmethod
    def from_transformers(
        cls, tokenizer: Any, max_length: int | None = None, limit: int | None = None
    ) -> Tokenizer:
        """Wrap a transformers fast tokenizer (e.g. ``CLIPTokenizer``, ``PreTrainedTokenizerFast``); ``max_length``
        and ``limit`` as in :meth:`from_folder`."""
        config = _transformers_config(tokenizer)
        return cls(
            tokenizer.backend_tokenizer, _length(max_length, config["model_max_length"], limit), config
        )


def _length(max_length: int | None, model_max_length: Any, limit: int | None) -> int:
    """``max_length`` if given, else the tokenizer's ``model_max_length`` (77 when unset) capped at ``limit``."""
    if max_length is not None:
        return max_length
    default = int(model_max_length or 77)
    return min(default, limit) if limit is not None else default


def _transformers_config(tokenizer: Any) -> dict[str, Any]:
    """The special tokens and ``model_max_length`` of a transformers tokenizer, as ``tokenizer_config.json`` has them."""
    config: dict[str, Any] = {
        key: str(getattr(tokenizer, key))
        for key in SPECIAL_TOKEN_KEYS
        if getattr(tokenizer, key, None) is not None
    }
    config["model_max_length"] = int(
        min(tokenizer.model_max_length, 1_000_000)
    )  # transformers' "unset" is ~1e30
    return config


def _convert_with_transformers(
    folder: Path, config: dict[str, Any]
) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    from transformers import AutoTokenizer

    try:
        # trust_remote_code=False: never run a folder's code, nor ask on stdin whether to.
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise OSError(f"Could not load the tokenizer in {folder}: {error}") from error
    return tokenizer.backend_tokenizer, {**config, **_transformers_config(tokenizer)}

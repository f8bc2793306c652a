"""Model cards: the ``README.md`` that ``save_pretrained`` and ``push_to_hub`` write beside a pipeline.

A card has the YAML front matter the Hugging Face Hub reads (``library_name: txt2img``,
``pipeline_tag: text-to-image``, ``license``, ``tags``, and ``datasets``/``base_model`` when known), what
the pipeline is made of, a usage example that runs as written, and, when given, how the model was trained
and what was measured.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from txt2img.utils import EMBEDDED_MODEL_NAME

if TYPE_CHECKING:
    from txt2img.pipeline import Txt2ImgPipeline

logger = logging.getLogger(__name__)

MODEL_CARD_NAME = "README.md"
_PLAIN_YAML = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_YAML_SPECIAL = re.compile(r"^(true|false|yes|no|on|off|null|[-+.0-9e_]+)$", re.IGNORECASE)


@dataclasses.dataclass
class ModelCard:
    """What a model card says beyond what the pipeline itself tells (its components and size).

    Attributes:
        license: The weights' license as a Hub license id (``"apache-2.0"``, ``"mit"``, ...); ``"other"``
            (the default) when not stated.
        tags: Hub tags besides ``txt2img`` and ``text-to-image``.
        datasets: Hub ids or names of the training data sets.
        base_model: The Hub id of the model this one was fine-tuned or converted from.
        description: A paragraph on what the model draws and how well.
        example_prompt: The prompt of the usage example.
        training: Markdown: the training data and how the model was trained (steps, time, hardware).
        evaluation: Markdown: what was measured, on what, and the results (e.g. a table).
    """

    license: str = "other"
    tags: list[str] = dataclasses.field(default_factory=list)
    datasets: list[str] = dataclasses.field(default_factory=list)
    base_model: str | None = None
    description: str | None = None
    example_prompt: str = "a red circle on a blue background"
    training: str | None = None
    evaluation: str | None = None

    @classmethod
    def from_value(cls, value: ModelCard | dict[str, Any] | None) -> ModelCard:
        """A ``ModelCard`` from itself, a dict of its fields, or ``None`` (the defaults).

        Raises:
            TypeError: anything else, or a dict with keys that are not fields.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise TypeError(f"model_card has unknown keys {unknown}; known keys: {sorted(names)}.")
            return cls(**value)
        raise TypeError(
            f"model_card must be a ModelCard or a dict of its fields, not {type(value).__name__}."
        )

    def render(self, pipe: Txt2ImgPipeline, model_id: str) -> str:
        """The card's text for ``pipe``, its usage example loading ``model_id`` (a Hub repo id, a folder, or
        ``txt2img.utils.EMBEDDED_MODEL_NAME`` for the model inside the package)."""
        from txt2img import __version__

        front = {
            "library_name": "txt2img",
            "pipeline_tag": "text-to-image",
            "license": self.license,
            "tags": [
                "txt2img",
                "text-to-image",
                *(t for t in self.tags if t not in ("txt2img", "text-to-image")),
            ],
            "datasets": self.datasets,
            "base_model": self.base_model,
        }
        lines = ["---"]
        for key, value in front.items():
            if isinstance(value, list) and value:
                lines += [f"{key}:", *(f"- {_yaml_scalar(v)}" for v in value)]
            elif isinstance(value, str):
                lines.append(f"{key}: {_yaml_scalar(value)}")
        lines.append("---")
        rows = "\n".join(
            f"| `{name}` | {type(component).__name__} | {_count(component)} |"
            for name, component in pipe.components.items()
        )
        description = self.description or (
            "A one-step text-to-image pipeline for [txt2img](https://pypi.org/project/txt2img/): a text encoder, "
            "a generator that turns noise and text into latents in a single forward pass, and a VAE decoder."
        )
        size = pipe.default_size
        if model_id == EMBEDDED_MODEL_NAME:  # the model inside the package: no path to give
            imports, load, cli_model = "DEFAULT_MODEL, Txt2ImgPipeline", "DEFAULT_MODEL", ""
        else:
            imports, load, cli_model = (
                "Txt2ImgPipeline",
                json.dumps(model_id),
                f" --model {shlex.quote(model_id)}",
            )
        body = f"""# txt2img pipeline

{description}

Native size: {size} × {size} pixels. Saved with txt2img {__version__}.

| component | class | parameters |
|---|---|---|
{rows}

## Usage

With `pip install txt2img`:

```python
import torch
from txt2img import {imports}

pipe = Txt2ImgPipeline.from_pretrained({load})
image = pipe(
    {json.dumps(self.example_prompt)},
    generator=torch.Generator().manual_seed(0),
).images[0]
image.save("out.png")
```

On the command line: `txt2img {shlex.quote(self.example_prompt)}{cli_model} -o out.png`"""
        sections = ["\n".join(lines), body]
        if self.training:
            sections.append(f"## Training\n\n{self.training.strip()}")
        if self.evaluation:
            sections.append(f"## Evaluation\n\n{self.evaluation.strip()}")
        return "\n\n".join(sections) + "\n"


def write_model_card(
    pipe: Txt2ImgPipeline,
    folder: Path,
    card: ModelCard | None,
    model_id: str,
    *,
    overwrite: bool,
) -> bool:
    """Write ``folder/README.md`` for ``pipe`` unless one is there and ``overwrite`` is false.

    A card that was asked for (``card`` given) but not written is a warning; a default one, a log message.

    Returns:
        Whether the card was written.
    """
    text = (card or ModelCard()).render(pipe, model_id)
    path = folder / MODEL_CARD_NAME
    if path.exists() and not overwrite:
        message = (
            f"{path} already exists and was kept; pass overwrite_model_card=True to replace it with "
            "txt2img's model card."
        )
        if card is not None:
            warnings.warn(message, stacklevel=3)
        else:
            logger.info(message)
        return False
    path.write_text(text, encoding="utf-8")
    return True


def _yaml_scalar(value: str) -> str:
    """``value`` as a YAML string: bare when YAML reads it back as that string, else quoted."""
    plain = _PLAIN_YAML.match(value) and not _YAML_SPECIAL.match(value)
    return value if plain else json.dumps(value)


def _count(module: Any) -> str:
    parameters = getattr(module, "parameters", None)
    if parameters is None:
        return "?"
    total = sum(p.numel() for p in parameters())
    return f"{total / 1e6:.1f} M" if total >= 100_000 else f"{total:,}"

"""Working with generated images: grids, and PNG files that carry the parameters that made them.

The parameters are stored as other image tools store them (AUTOMATIC1111's web UI and the many tools that
read its files): one PNG text chunk named ``parameters`` holding the prompt, then one line of
``Key: value`` pairs::

    a large red circle in the top left corner on a blue background
    Steps: 1, Seed: 0, Size: 64x64, Model: txt2img.DEFAULT_MODEL, Version: txt2img 0.1.0

A value holding a comma, colon, quote or line break is written as a JSON string, as those tools do.
``txt2img --from-png FILE`` reads the chunk back and makes the same image again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

#: How the embedded default model (``txt2img.DEFAULT_MODEL``, a folder inside the installed package) is
#: named in PNG metadata: the same on every machine, and neither a Hub repo id nor a likely folder name.
EMBEDDED_MODEL_NAME = "txt2img.DEFAULT_MODEL"
PARAMETERS_KEY = "parameters"
NEGATIVE_PROMPT = "Negative prompt:"

# One "Key: value" pair of the last line; a value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


# ---------------------------------------------------------------------------------------------------------
# Grids


def make_image_grid(images: list[Image.Image], rows: int, cols: int) -> Image.Image:
    """Paste equally sized images into one image of ``rows`` × ``cols``, filled row by row.

    Args:
        images: Exactly ``rows * cols`` PIL images, all of one size (the grid takes the first one's mode).
        rows: Number of rows.
        cols: Number of columns.

    Returns:
        An image of ``cols * width`` × ``rows * height`` pixels.

    Raises:
        ValueError: ``rows * cols`` is not the number of images, or the images differ in size.
    """
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if rows * cols != len(images):
        raise ValueError(
            f"A grid of rows={rows} × cols={cols} holds {rows * cols} images, but {len(images)} were given: "
            "pass rows and cols whose product is the number of images."
        )
    sizes = sorted({image.size for image in images})
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise ValueError(
            f"The images differ in size ({shown}): resize them to one size before making a grid."
        )
    width, height = images[0].size
    grid = Image.new(images[0].mode, (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid


def grid_shape(count: int) -> tuple[int, int]:
    """``(rows, cols)`` for ``count`` images: the most nearly square layout with no empty cell, wider than
    tall (8 → 2 × 4, 9 → 3 × 3, 7 → 1 × 7)."""
    rows = max(r for r in range(1, math.isqrt(max(count, 1)) + 1) if count % r == 0)
    return rows, max(count, 1) // rows


# ---------------------------------------------------------------------------------------------------------
# Generation parameters in PNG files


@dataclasses.dataclass
class GenerationParameters:
    """What made one image: enough to make it again with the same model, device and dtype.

    Attributes:
        prompt: The prompt.
        seed: The seed of the image's own ``torch.Generator``; ``None`` when the image cannot be made again
            from a seed (no generator, a generator already used, or the second and later images drawn
            from one shared generator).
        width: Image width in pixels.
        height: Image height in pixels.
        steps: Generator passes (``num_inference_steps``).
        model: The Hub repo id or folder the pipeline was loaded from, :data:`EMBEDDED_MODEL_NAME` for the
            embedded model, ``None`` for a pipeline built in memory.
        truncation_psi: Written only when it is not 1.
        version: The txt2img version that made the image (``"txt2img 0.1.0"``).
        extra: Any other ``Key: value`` pairs, as read (files written by other tools: ``"Sampler"``,
            ``"CFG scale"``, ``"Negative prompt"``, ...).
    """

    prompt: str
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    model: str | None = None
    truncation_psi: float = 1.0
    version: str | None = None
    extra: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_text(self) -> str:
        """The ``parameters`` text: the prompt, then a line of ``Key: value`` pairs."""
        pairs: dict[str, object] = {"Steps": self.steps, "Seed": self.seed}
        if self.width is not None and self.height is not None:
            pairs["Size"] = f"{self.width}x{self.height}"
        pairs["Model"] = self.model
        if self.truncation_psi != 1:
            pairs["Truncation psi"] = self.truncation_psi
        pairs["Version"] = self.version
        pairs.update({k: v for k, v in self.extra.items() if k != "Negative prompt"})
        line = ", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs.items() if value is not None)
        negative = self.extra.get("Negative prompt")
        return "\n".join([self.prompt, *([f"{NEGATIVE_PROMPT} {negative}"] if negative else []), line])

    @classmethod
    def from_text(cls, text: str) -> GenerationParameters:
        """Parse a ``parameters`` text, txt2img's or another tool's.

        The last line holds the ``Key: value`` pairs when it has at least three of them (else the whole
        text is the prompt); a line starting ``Negative prompt:`` goes to ``extra``; the lines before are
        the prompt.

        Raises:
            ValueError: a Steps, Seed, Size or Truncation psi value that is not a number (or ``WxH``).
        """
        lines = text.split("\n")
        pairs: dict[str, str] = {}
        found = _PAIR.findall(lines[-1]) if len(lines) > 1 else []
        if len(found) >= 3:
            pairs = {key.strip(): _unquote(value.strip()) for key, value in found}
            lines = lines[:-1]
        negative = next((i for i, line in enumerate(lines) if i and line.startswith(NEGATIVE_PROMPT)), None)
        if negative is not None:
            pairs["Negative prompt"] = "\n".join(lines[negative:])[len(NEGATIVE_PROMPT) :].strip()
            lines = lines[:negative]
        params = cls(prompt="\n".join(lines))
        for key, value in pairs.items():
            params._set(key, value)
        return params

    def _set(self, key: str, value: str) -> None:
        try:
            if key == "Steps":
                self.steps = int(value)
            elif key == "Seed":
                self.seed = int(value)
            elif key == "Size":
                width, height = value.lower().split("x")
                self.width, self.height = int(width), int(height)
            elif key == "Truncation psi":
                self.truncation_psi = float(value)
            elif key == "Model":
                self.model = value
            elif key == "Version":
                self.version = value
            else:
                self.extra[key] = value
        except ValueError as error:
            expected = "WIDTHxHEIGHT" if key == "Size" else "a number"
            raise ValueError(f"The {key!r} value {value!r} is not {expected}.") from error


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            pass
    return value


def save_png(
    image: Image.Image, path: str | os.PathLike[str], parameters: GenerationParameters | None
) -> Path:
    """Write ``image`` as a PNG file, with ``parameters`` (if given) in its ``parameters`` text chunk.

    Returns:
        The path written.
    """
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters.to_text())
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str | os.PathLike[str]) -> GenerationParameters | None:
    """The generation parameters stored in an image file's ``parameters`` text chunk.

    Reads the files txt2img writes (``txt2img`` command, ``output.save``) and those of other tools that
    use the same chunk.

    Args:
        path: A PNG file.

    Returns:
        The parameters, or ``None`` when the file has no ``parameters`` chunk.

    Raises:
        OSError: the file is missing or not an image.
        ValueError: the chunk holds a malformed number (naming the file).
    """
    with Image.open(path) as image:
        text = image.info.get(PARAMETERS_KEY)
    if not isinstance(text, str):
        return None
    try:
        return GenerationParameters.from_text(text)
    except ValueError as error:
        raise ValueError(f"{path}: the PNG's parameters chunk is malformed: {error}") from error


def output_paths(path_or_pattern: str | os.PathLike[str], count: int) -> list[Path]:
    """Where ``count`` images go.

    A pattern with ``{i}`` (or a format such as ``{i:03d}``) is filled with each image's index. Otherwise
    one image goes to the path itself, several to ``NAME-0.png``, ``NAME-1.png``, .... A name without a
    suffix gets ``.png``.

    Raises:
        ValueError: the name ends in another suffix (PNG is the format that carries the parameters), or a
            pattern gives two images the same name.
    """
    text = os.fspath(path_or_pattern)
    if "{" in text:
        try:
            paths = [Path(text.format(i=i)) for i in range(count)]
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"{text!r} is not a valid pattern: use {{i}} for the image index ({error})."
            ) from error
        if len(set(paths)) != count:
            raise ValueError(f"The pattern {text!r} gives several images one name: put {{i}} in it.")
    else:
        path = Path(text)
        paths = (
            [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
        )
    fixed = []
    for path in paths:
        if not path.suffix:
            path = path.with_name(path.name + ".png")
        elif path.suffix.lower() != ".png":
            raise ValueError(
                f"{path} does not end in .png: images are saved as PNG files (the format that carries the "
                "generation parameters). Use a .png name, or save images yourself with image.save(...)."
            )
        fixed.append(path)
    return fixed


def model_name(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """How a model is named in PNG metadata: :data:`EMBEDDED_MODEL_NAME` for the embedded model, else the
    repo id or folder as given."""
    if name_or_path is None:
        return None
    from txt2img import DEFAULT_MODEL

    if Path(name_or_path).expanduser().resolve() == Path(DEFAULT_MODEL).resolve():
        return EMBEDDED_MODEL_NAME
    return os.fspath(name_or_path)


def model_location(name: str) -> str:
    """The inverse of :func:`model_name`: where to load a model named in PNG metadata from."""
    from txt2img import DEFAULT_MODEL

    return DEFAULT_MODEL if name == EMBEDDED_MODEL_NAME else name

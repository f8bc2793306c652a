"""What a ``Txt2ImgPipeline`` call returns: the images, the parameters that made each one, and ways to
save them (PNG files carrying those parameters) and to show them (a grid, in Jupyter)."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from txt2img.images import numpy_to_pil, to_numpy
from txt2img.utils import GenerationParameters, grid_shape, make_image_grid, output_paths, save_png


@dataclasses.dataclass
class Txt2ImgPipelineOutput:
    """What a pipeline call returns.

    Attributes:
        images: PIL images (``output_type="pil"``), an array (B, H, W, 3) in [0, 1] (``"np"``), a tensor
            (B, 3, H, W) in [0, 1] (``"pt"``), or the scaled latents (B, C, h, w) (``"latent"``).
        parameters: What made each image (prompt, seed, size, steps, model), written into the PNG files by
            :meth:`save`; ``None`` when the call had no prompt (``prompt_embeds=``).
    """

    images: list[Image.Image] | np.ndarray | torch.Tensor
    parameters: list[GenerationParameters] | None = None

    def pil_images(self) -> list[Image.Image]:
        """The images as PIL images, whatever the ``output_type`` (rounded to 8 bits as ``"pil"`` rounds).

        Raises:
            ValueError: the output holds latents, not images.
        """
        if isinstance(self.images, list):
            return self.images
        if isinstance(self.images, torch.Tensor) and self.images.ndim == 4 and self.images.shape[1] == 3:
            return numpy_to_pil(to_numpy(self.images.float()))
        if isinstance(self.images, np.ndarray) and self.images.ndim == 4 and self.images.shape[-1] == 3:
            return numpy_to_pil(self.images)
        raise ValueError(
            "This output holds latents, not images (output_type='latent'): decode them, or call the "
            "pipeline with output_type='pil'."
        )

    def save(self, path: str | os.PathLike[str], *, metadata: bool = True) -> list[Path]:
        """Write the images as PNG files, each carrying its generation parameters (see ``txt2img.utils``).

            output.save("cat.png")          # one image: cat.png; several: cat-0.png, cat-1.png, ...
            output.save("out/cat-{i:02d}.png")  # cat-00.png, cat-01.png, ... (folders are created)

        Args:
            path: A file name, or a pattern with ``{i}`` for the image's index. A name without a suffix
                gets ``.png``.
            metadata: Write the prompt, seed, size, steps and model into each file (a ``parameters`` text
                chunk that ``txt2img.utils.read_png_metadata`` and ``txt2img --from-png`` read). ``False``
                writes the pixels only, e.g. to share an image without its prompt.

        Returns:
            The paths written, in image order.

        Raises:
            ValueError: a name that does not end in ``.png``, or an output of latents.
        """
        images = self.pil_images()
        paths = output_paths(path, len(images))
        parameters = self.parameters if metadata and self.parameters is not None else [None] * len(images)
        for image, params, file in zip(images, parameters, paths, strict=True):
            file.parent.mkdir(parents=True, exist_ok=True)
            save_png(image, file, params)
        return paths

    def _repr_png_(self) -> bytes | None:
        """Jupyter shows the output as one grid of its images (nothing for latents)."""
        try:
            images = self.pil_images()
        except ValueError:
            return None
        if not images:
            return None
        buffer = io.BytesIO()
        make_image_grid(images, *grid_shape(len(images))).save(buffer, format="PNG")
        return buffer.getvalue()

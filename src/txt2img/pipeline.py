"""``Txt2ImgPipeline``: prompt → text encoder → one generator pass → VAE decoder → images.

Everything a call needs (noise, progress bar, sizes) is created in the call; nothing is stored on the
pipeline, so concurrent calls from several threads give the same images as calls made one after another.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
from PIL import Image

from txt2img import allocator, checks, compiling, hub, linear, logs, memory, packed_weights, precision, saving
from txt2img.attention import SliceSize, set_attention_slicing
from txt2img.gan import GANGenerator
from txt2img.generation import GeneratorArg, draw_noise, reproducible_seeds
from txt2img.images import OUTPUT_TYPES, numpy_to_pil, to_numpy, to_unit_range
from txt2img.model_card import MODEL_CARD_NAME, ModelCard, write_model_card
from txt2img.modeling import read_json
from txt2img.offload import DeviceStore, DiskStore, Offloader, default_execution_device
from txt2img.pipeline_output import Txt2ImgPipelineOutput
from txt2img.placement import place, resolve_device, resolve_dtype
from txt2img.text_encoder import PromptEmbeds, TextEncoder
from txt2img.unet import UNetGenerator
from txt2img.utils import GenerationParameters, model_name
from txt2img.vae import VAEDecoder
from txt2img.vae_tiny import TinyVAEDecoder

logger = logging.getLogger(__name__)

MODEL_INDEX_NAME = "model_index.json"
COMPONENT_CLASSES: dict[str, type[Any]] = {
    "TextEncoder": TextEncoder,
    "GANGenerator": GANGenerator,
    "UNetGenerator": UNetGenerator,
    "VAEDecoder": VAEDecoder,
    "TinyVAEDecoder": TinyVAEDecoder,
}
#: diffusers pipelines whose folders load as a Txt2ImgPipeline: component → (subfolder, class loading it).
DIFFUSERS_PIPELINES = ("StableDiffusionPipeline",)
DIFFUSERS_LAYOUT: dict[str, tuple[str, type[Any]]] = {
    "text_encoder": ("text_encoder", TextEncoder),
    "gan": ("unet", UNetGenerator),
    "vae": ("vae", VAEDecoder),
}


class Txt2ImgPipeline:
    """Text-to-image in one generator pass.

    Args:
        text_encoder: Prompts → token features and pooled vectors.
        gan: Noise + text features → latents, in one forward pass: txt2img's ``GANGenerator`` or a one-step
            ``UNetGenerator`` (SD-Turbo, SDXS).
        vae: Latents → images: a KL ``VAEDecoder`` or a ``TinyVAEDecoder`` (TAESD).
    """

    component_names = ("text_encoder", "gan", "vae")

    def __init__(
        self,
        text_encoder: TextEncoder,
        gan: GANGenerator | UNetGenerator,
        vae: VAEDecoder | TinyVAEDecoder,
    ) -> None:
        self.text_encoder = text_encoder
        self.gan = gan
        self.vae = vae
        self._progress_bar_config: dict[str, Any] = {}
        self._offloader: Offloader | None = None
        #: What a call's estimated memory is checked against (see :meth:`set_memory_limit`).
        self.memory_limit: memory.MemoryLimit = "auto"
        #: The Hub repo id or folder ``from_pretrained`` loaded, written into PNG metadata; ``None`` when
        #: the pipeline was built in memory.
        self.name_or_path: str | None = None
        #: Whether :meth:`compile` compiled the networks' blocks.
        self.compiled = False

    # -----------------------------------------------------------------------------------------------------
    # Properties and placement

    @property
    def components(self) -> dict[str, Any]:
        """The components by name, as ``from_pretrained`` accepts them as keywords."""
        return {name: getattr(self, name) for name in self.component_names}

    @property
    def device(self) -> torch.device:
        """The execution device (the generator's; with offloading, where components compute)."""
        return self._offloader.execution_device if self._offloader is not None else self.gan.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the generator computes in."""
        return self.gan.dtype

    @property
    def size_factor(self) -> int:
        """Image height and width must be multiples of this many pixels."""
        return self.vae.scale_factor * self.gan.size_factor

    @property
    def default_size(self) -> int:
        """The native image side in pixels."""
        return self.gan.sample_size * self.vae.scale_factor

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        memory_format: torch.memory_format | None = None,
    ) -> Txt2ImgPipeline:
        """Move every component to ``device``, cast it to ``dtype`` and/or store its convolution weights in
        ``memory_format``; returns the pipeline.

        ``torch.channels_last`` (the default of ``from_pretrained``) makes convolutions several times faster
        on CPUs; ``torch.contiguous_format`` undoes it.
        """
        if self._offloader is not None and (device is not None or dtype is not None):
            if self._offloader.sequential:
                raise RuntimeError(
                    "This pipeline uses sequential CPU offload, which places every layer itself: .to() would "
                    "break it. Call pipe.disable_offload() first."
                )
            warnings.warn(
                "pipe.to() turns model CPU offload off: every component now stays on the device.",
                stacklevel=2,
            )
            self.disable_offload()
        target = resolve_device(device) if device is not None else None
        cast = resolve_dtype(dtype, device=target or self.device) if dtype is not None else None
        for component in self.components.values():
            place(component, target, cast)
            if memory_format is not None:
                component.to(memory_format=memory_format)
        return self

    # -----------------------------------------------------------------------------------------------------
    # Offloading and memory

    def enable_model_cpu_offload(self, device: torch.device | str | None = None) -> None:
        """Keep every component off the execution device except while it runs, one component at a time.

        With an accelerator the components rest in CPU memory. On a machine without one (``device`` ``None``
        or ``"cpu"``) they rest on disk: their weights are written once to a private temporary folder and
        memory-mapped only while each runs, so the peak memory is about that of the largest component.
        Calling it again re-applies it; ``disable_offload`` undoes it. Concurrent calls of an offloaded
        pipeline run one after another.

        Args:
            device: The execution device; default CUDA, else MPS, else the CPU.
        """
        self._enable_offload(device, sequential=False)

    def enable_sequential_cpu_offload(self, device: torch.device | str | None = None) -> None:
        """Like :meth:`enable_model_cpu_offload`, per layer: each submodule's weights come onto the device
        only for its own forward pass. The lowest memory, and the slowest (a move per layer per call);
        ``.to()`` is refused while it is on.

        Args:
            device: The execution device; default CUDA, else MPS, else the CPU.
        """
        self._enable_offload(device, sequential=True)

    def disable_offload(self) -> None:
        """Undo offloading: every component back on the execution device (in memory), hooks removed."""
        if self._offloader is not None:
            self._offloader.remove()
            self._offloader = None
            for component in self.components.values():
                packed_weights.set_module_packing(component, True)

    def enable_attention_slicing(self, slice_size: SliceSize = "auto") -> None:
        """Compute attention in chunks of queries, so that its peak memory falls where attention is the peak.

        Args:
            slice_size: ``"auto"`` (default) slices only where PyTorch would build the full score matrix
                (no fused kernel for the device, dtype or mask) and it would exceed 256 MiB; ``"max"``
                slices into chunks of 256 queries; an int sets the queries per chunk; ``None`` turns it off.
                Results equal unsliced ones within float tolerance. On CPUs and recent CUDA GPUs PyTorch's
                fused kernels never build the full matrix, so ``"auto"`` does nothing there and an explicit
                size only costs time (about 1.3× for ``"max"`` on this project's CPUs).
        """
        for component in self.components.values():
            set_attention_slicing(component, slice_size)

    def disable_attention_slicing(self) -> None:
        """Compute attention in one piece again."""
        self.enable_attention_slicing(None)

    def compile(
        self,
        *,
        mode: str | None = None,
        dynamic: bool | None = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Txt2ImgPipeline:
        """Compile the networks' repeated blocks with ``torch.compile`` (opt-in; see ``txt2img.compiling``).

        Images equal uncompiled ones within float tolerance. The first call at each new size and batch size
        compiles, which takes seconds on a GPU and up to minutes on a small CPU; later calls, and later
        processes with the same model and shapes (through Inductor's cache), skip it. It pays for a server
        or a long batch, not for one image.

        Args:
            mode: ``torch.compile``'s mode: ``None`` (its default), ``"reduce-overhead"`` (CUDA graphs),
                ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``.
            dynamic: ``False`` (the default) compiles one version per input shape; ``None`` lets PyTorch
                generalise over sizes after the second one.
            cache_dir: Where Inductor keeps the compiled code (``TORCHINDUCTOR_CACHE_DIR``); default its own,
                ``<temp dir>/torchinductor_<user>``.

        Returns:
            The pipeline.

        Raises:
            RuntimeError: If offloading is on (call ``disable_offload`` first), or ``torch.compile`` cannot run
                here (no C++ compiler for CPU kernels, an unsupported Python).
            ValueError: For an unknown ``mode``.
        """
        if self._offloader is not None:
            raise RuntimeError(
                "pipe.compile() does not work with CPU offloading, whose hooks move weights during the call: "
                "call pipe.disable_offload() first."
            )
        compiling.check_compile_supported(self.device, mode)  # before anything changes
        if cache_dir is not None:
            compiling.set_cache_dir(cache_dir)
        if self.device.type == "cpu":
            linear.cpu_linear_backend()  # decide the linear backend now, not while tracing
        for component in self.components.values():
            compiling.compile_blocks(component, mode=mode, dynamic=dynamic)
        self.compiled = True
        return self

    def set_memory_limit(self, limit: memory.MemoryLimit = "auto") -> None:
        """Refuse calls whose estimated memory exceeds ``limit``, before they start (``txt2img.memory``).

        A call that would exhaust memory otherwise gets the whole process killed (on a CPU) or fails deep in a
        layer (on a GPU); refused, it raises :class:`~txt2img.memory.InsufficientMemoryError` (a
        ``MemoryError`` and a ``ValueError``) with the estimate and what to change.

        Args:
            limit: ``"auto"`` (the default): the memory available on the execution device at the start of each
                call. A number of bytes: that instead, e.g. a share of the machine for each of several
                workers, or more than is free on a machine that swaps. ``None``: no check.
        """
        self.memory_limit = memory.check_limit(limit)

    def memory_estimate(
        self,
        batch_size: int = 1,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
    ) -> int:
        """Estimated bytes a call of ``batch_size`` images allocates beyond the weights (what
        :meth:`set_memory_limit` checks); default size ``default_size``."""
        height, width = height or self.default_size, width or self.default_size
        return memory.call_bytes(self, batch_size, height, width, output_type)

    def _enable_offload(self, device: torch.device | str | None, *, sequential: bool) -> None:
        if self.compiled:
            raise RuntimeError(
                "This pipeline's blocks are compiled (pipe.compile()), and offloading's hooks would move "
                "weights inside compiled code: load the pipeline again and enable offloading without compiling."
            )
        target = resolve_device(device) if device is not None else default_execution_device()
        self.disable_offload()
        store = DiskStore() if target.type == "cpu" else DeviceStore(target)
        for component in self.components.values():
            packed_weights.set_module_packing(component, False)  # weights that come and go are not packed
        self._offloader = Offloader(self.components, store, sequential=sequential)

    def _call_lock(self) -> Any:
        return self._offloader.lock if self._offloader is not None else contextlib.nullcontext()

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm progress bar of this pipeline's calls, e.g. ``disable=True``.

        ``txt2img.disable_progress_bars()`` and the environment variable ``TXT2IMG_DISABLE_PROGRESS_BAR=1``
        turn it off too, along with the bar of ``from_pretrained``.
        """
        self._progress_bar_config = dict(kwargs)

    # -----------------------------------------------------------------------------------------------------
    # Saving and loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        torch_dtype: torch.dtype | str | None = None,
        memory_format: torch.memory_format = torch.channels_last,
        **components: Any,
    ) -> Txt2ImgPipeline:
        """Load a pipeline: a ``model_index.json`` plus one subfolder per component.

        Both txt2img's layout and diffusers' ``StableDiffusionPipeline`` layout load (SD-Turbo, SDXS, the
        Stable Diffusion 1.x/2.x family): its ``text_encoder``/``tokenizer`` become the text encoder, its
        ``unet`` and ``scheduler`` the generator, its ``vae`` (KL or tiny) the decoder. A safety checker and
        feature extractor, if listed, are not loaded.

        Args:
            name_or_path: A local folder (read in place) or a Hub repo id (only the needed files are
                downloaded into the Hub cache).
            dtype: Weight dtype of every loaded component; default ``"auto"``: float32 on CPUs, bfloat16 on
                CUDA GPUs that have it (else float16), float16 on MPS. Half precision asked for on a CPU is
                stored as asked but computed in float32 (see ``txt2img.placement``).
            device: Where to put them; default CPU.
            revision: Hub branch, tag or commit sha.
            cache_dir: Hub cache folder.
            local_files_only: Make no network request.
            token: Hub token for private or gated repos.
            torch_dtype: Deprecated name of ``dtype``.
            memory_format: How convolution weights of every component (passed-in ones included) are stored;
                ``torch.channels_last`` (default) is several times faster on CPUs than ``torch.contiguous_format``.
            **components: Components to use instead of loading them (``text_encoder=``, ``gan=``, ``vae=``).

        Returns:
            The pipeline.

        Raises:
            OSError: the model, a component folder or a file is missing or broken.
            ValueError: an unknown component class or keyword.
        """
        dtype = resolve_dtype(dtype, torch_dtype, device)
        unknown = sorted(set(components) - set(cls.component_names))
        if unknown:
            raise ValueError(
                f"Unknown components {unknown}: a Txt2ImgPipeline has {list(cls.component_names)}."
            )
        fetch = functools.partial(
            hub.resolve_folder, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        root = fetch(name_or_path, allow_patterns=[MODEL_INDEX_NAME], revision=revision)
        needed = pipeline_layout(
            root, read_model_index(root), [n for n in cls.component_names if n not in components]
        )
        if not Path(name_or_path).expanduser().is_dir() and needed:
            # Fetch the needed components' files at the very commit whose model_index.json was read.
            patterns = [
                p
                for subfolder, component_class in needed.values()
                for p in component_class.download_patterns(subfolder)
            ]
            root = fetch(name_or_path, allow_patterns=patterns, revision=root.name)
        logger.info("Loading %s from %s", ", ".join(needed) or "no component", root)
        loaded = dict(components)
        with logs.progress_bar(len(needed), desc="Loading pipeline components", leave=False) as progress:
            for name, (subfolder, component_class) in needed.items():
                if not (root / subfolder).is_dir():
                    raise OSError(
                        f"{root} has no folder {subfolder!r} for the component {name!r} listed in "
                        f"{MODEL_INDEX_NAME}."
                    )
                loaded[name] = component_class.from_pretrained(
                    root, subfolder=subfolder, dtype=dtype, device=device
                )
                progress.update()
        for component in loaded.values():  # passed-in components too: the pipeline runs them
            component.to(memory_format=memory_format)
        pipe = cls(**loaded)
        pipe.name_or_path = os.fspath(name_or_path)
        return pipe

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        model_card: ModelCard | dict[str, Any] | None = None,
        overwrite_model_card: bool = False,
        repo_id: str | None = None,
    ) -> None:
        """Write ``model_index.json``, one subfolder per component and a model card (``README.md``).

        A ``README.md`` already in ``save_directory`` is kept (your own card is never lost), unless
        ``overwrite_model_card=True``; so are files the save does not write. The save is all at once
        (``txt2img.saving``): everything is written into a hidden folder first and then moved into place,
        ``model_index.json`` last, so a save that fails or is interrupted never leaves a folder that loads
        into something else, and a failed save into an existing folder leaves it as it was.

        Args:
            save_directory: The folder (created if needed).
            model_card: What the card says beyond what the pipeline tells: ``license``, ``tags``,
                ``datasets``, ``base_model``, ``description``, ``example_prompt``, and markdown sections
                ``training`` and ``evaluation`` (a :class:`~txt2img.model_card.ModelCard` or a dict of its fields).
            overwrite_model_card: Replace a ``README.md`` already in ``save_directory``.
            repo_id: The Hub repo id that the card's usage example loads; default ``save_directory`` as
                given.

        Raises:
            TypeError: ``model_card`` is not a ``ModelCard`` or a dict of its fields.
        """
        from txt2img import __version__

        card = ModelCard.from_value(model_card) if model_card is not None else None  # checked before writing
        folder = Path(save_directory)
        model_id = repo_id or os.fspath(save_directory)
        with saving.staged_folder(folder, marker=MODEL_INDEX_NAME) as stage:
            index: dict[str, Any] = {"_class_name": type(self).__name__, "_txt2img_version": __version__}
            for name, component in self.components.items():
                index[name] = ["txt2img", type(component).__name__]
                component.save_pretrained(stage / name)
            (stage / MODEL_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            # A card already in the folder is kept (write_model_card only says so); else the new one joins.
            kept = (folder / MODEL_CARD_NAME).exists() and not overwrite_model_card
            write_model_card(self, folder if kept else stage, card, model_id, overwrite=overwrite_model_card)
        logger.info("Saved the pipeline to %s", folder)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        model_card: ModelCard | dict[str, Any] | None = None,
        overwrite_model_card: bool = False,
    ) -> str:
        """Save the pipeline and upload it to the Hub repo ``repo_id`` (created if needed).

        The model card's usage example loads ``repo_id``. A ``README.md`` the repo already has is kept,
        unless ``overwrite_model_card=True``.

        Args:
            repo_id: ``"org/name"``.
            token: Hub token with write access; default: the saved login.
            private: Create the repo private.
            revision: The branch to commit to.
            commit_message: Default ``"Upload with txt2img"``.
            model_card: As for :meth:`save_pretrained`.
            overwrite_model_card: Replace the repo's ``README.md``.

        Returns:
            The URL of the commit.
        """
        card = ModelCard.from_value(model_card)
        return hub.push_folder(
            lambda folder: self.save_pretrained(folder, model_card=card, repo_id=repo_id),
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
            keep_existing=() if overwrite_model_card else (MODEL_CARD_NAME,),
        )

    # -----------------------------------------------------------------------------------------------------
    # Generation

    @overload
    def __call__(
        self,
        prompt: str | list[str] | None = ...,
        *,
        num_images_per_prompt: int = ...,
        height: int | None = ...,
        width: int | None = ...,
        num_inference_steps: int = ...,
        generator: GeneratorArg = ...,
        latents: torch.Tensor | None = ...,
        prompt_embeds: PromptEmbeds | None = ...,
        truncation_psi: float = ...,
        output_type: str = ...,
        return_dict: Literal[True] = ...,
    ) -> Txt2ImgPipelineOutput: ...

    @overload
    def __call__(
        self,
        prompt: str | list[str] | None = ...,
        *,
        num_images_per_prompt: int = ...,
        height: int | None = ...,
        width: int | None = ...,
        num_inference_steps: int = ...,
        generator: GeneratorArg = ...,
        latents: torch.Tensor | None = ...,
        prompt_embeds: PromptEmbeds | None = ...,
        truncation_psi: float = ...,
        output_type: str = ...,
        return_dict: Literal[False],
    ) -> tuple[Any]: ...

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 1,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: PromptEmbeds | None = None,
        truncation_psi: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Txt2ImgPipelineOutput | tuple[Any]:
        """Generate images from prompts.

        Args:
            prompt: A prompt or a list of prompts (or ``None`` with ``prompt_embeds``).
            num_images_per_prompt: Images per prompt.
            height: Image height in pixels, a multiple of ``size_factor``; default ``default_size``.
            width: Image width in pixels, likewise.
            num_inference_steps: Generator passes: 1 (the default, and the only value a GAN generator takes);
                2–4 let a UNet generator re-noise and refine.
            generator: A ``torch.Generator``, or one per image, for reproducible noise (drawn as diffusers
                draws it, so the same seed gives the same noise as diffusers).
            latents: Noise to use instead of drawing it, of shape ``gan.noise_shape(B, h, w)``.
            prompt_embeds: Prompts already encoded by ``encode_prompt``.
            truncation_psi: Below 1, less variety and more typical images.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: Return a :class:`Txt2ImgPipelineOutput` (else a one-element tuple).

        Returns:
            The images (see :class:`Txt2ImgPipelineOutput`).

        Raises:
            ValueError, TypeError: arguments that cannot work, with what to change.
            txt2img.memory.InsufficientMemoryError: a call that would need more memory than is available (or
                than :meth:`set_memory_limit` allows), refused before it starts.
        """
        # 1. Check inputs (and refuse a call that would exhaust memory)
        height, width, batch = self.check_inputs(
            prompt,
            prompt_embeds,
            num_images_per_prompt,
            height,
            width,
            num_inference_steps,
            truncation_psi,
            output_type,
            generator,
            latents,
        )
        num_images_per_prompt, num_inference_steps = int(num_images_per_prompt), int(num_inference_steps)
        latent_height, latent_width = height // self.vae.scale_factor, width // self.vae.scale_factor
        with (
            self._call_lock(),
            allocator.reuse_freed_memory(  # no fresh pages for every large activation
                self.device.type == "cpu" and batch * height * width >= allocator.MIN_PIXELS
            ),
            logs.progress_bar(3, desc="txt2img", leave=False, **self._progress_bar_config) as progress,
        ):
            # 2. Encode the prompt
            embeds = prompt_embeds if prompt_embeds is not None else self.encode_prompt(prompt)  # type: ignore[arg-type]
            embeds = embeds.repeat_interleave(num_images_per_prompt).to(self.device, self.dtype)
            progress.update()
            # 3. Prepare the noise (each image's seed first: drawing advances the generators)
            seeds: list[int | None] = [None] * len(embeds)
            if latents is None:
                seeds = reproducible_seeds(generator, len(embeds))
            noise = self.prepare_noise(len(embeds), latent_height, latent_width, generator, latents)
            # 4. Generate latents: one forward pass (or num_inference_steps of a UNet generator)
            result = self.generate_latents(
                noise, embeds, latent_height, latent_width, num_inference_steps, truncation_psi, generator
            )
            progress.update()
            # 5. Decode
            if output_type != "latent":
                result = self.decode_latents(result)
            progress.update()
            if self._offloader is not None:
                self._offloader.rest_all()
        # 6. Post-process
        images = self.postprocess(result, output_type)
        if not return_dict:
            return (images,)
        parameters = None
        if prompt is not None:
            parameters = self.describe_images(
                prompt, num_images_per_prompt, seeds, height, width, num_inference_steps, truncation_psi
            )
        return Txt2ImgPipelineOutput(images, parameters)

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: PromptEmbeds | None,
        num_images_per_prompt: int,
        height: int | None,
        width: int | None,
        num_inference_steps: int,
        truncation_psi: float,
        output_type: str,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> tuple[int, int, int]:
        """Check a call's arguments, and its estimated memory against the limit (``set_memory_limit``).

        Returns:
            The image ``(height, width)`` and the number of images.

        Raises:
            ValueError, TypeError: an argument that cannot work, naming it and what would.
            txt2img.memory.InsufficientMemoryError: the call would need more memory than the limit.
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass either prompt= or prompt_embeds=, exactly one of them.")
        if prompt is not None:
            prompts = len(checks.prompt_list(prompt))
        else:
            prompts = len(checks.prompt_embeds(prompt_embeds, *self.gan.text_dims))
        batch = prompts * checks.positive_int("num_images_per_prompt", num_images_per_prompt)
        checks.positive_int("num_inference_steps", num_inference_steps)
        checks.finite_number("truncation_psi", truncation_psi)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {', '.join(OUTPUT_TYPES)}.")
        height, width = (
            checks.image_side(name, self.default_size if value is None else value, self.size_factor)
            for name, value in (("height", height), ("width", width))
        )
        f = self.vae.scale_factor
        if latents is not None:
            checks.latents(latents, self.gan.noise_shape(batch, height // f, width // f))
        else:
            checks.generators(generator, batch)
        memory.check_call(self, batch, height, width, output_type, self.memory_limit)
        return height, width, batch

    def describe_images(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int,
        seeds: list[int | None],
        height: int,
        width: int,
        num_inference_steps: int,
        truncation_psi: float,
    ) -> list[GenerationParameters]:
        """What made each image of a call, for ``output.parameters`` and the PNG files ``output.save`` writes."""
        from txt2img import __version__

        prompts = [prompt] if isinstance(prompt, str) else prompt
        model = model_name(self.name_or_path)
        return [
            GenerationParameters(
                prompt=text,
                seed=seed,
                width=width,
                height=height,
                steps=num_inference_steps,
                model=model,
                truncation_psi=truncation_psi,
                version=f"txt2img {__version__}",
            )
            for text, seed in zip(
                [p for p in prompts for _ in range(num_images_per_prompt)], seeds, strict=True
            )
        ]

    def encode_prompt(self, prompt: str | list[str]) -> PromptEmbeds:
        """Encode prompts with the text encoder (reusable as ``prompt_embeds=``)."""
        return self.text_encoder([prompt] if isinstance(prompt, str) else list(prompt))

    def prepare_noise(
        self,
        batch_size: int,
        latent_height: int,
        latent_width: int,
        generator: GeneratorArg,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """The generator's input noise: ``latents`` if given, else drawn from ``generator`` (both already
        checked by ``check_inputs``)."""
        shape = self.gan.noise_shape(batch_size, latent_height, latent_width)
        if latents is not None:
            return latents.to(self.device, self.dtype)
        return draw_noise(shape, generator, device=self.device, dtype=self.dtype)

    def generate_latents(
        self,
        noise: torch.Tensor,
        embeds: PromptEmbeds,
        latent_height: int,
        latent_width: int,
        num_inference_steps: int,
        truncation_psi: float,
        generator: GeneratorArg,
    ) -> torch.Tensor:
        """The generator's latents for the noise: scaled latents (B, C, h, w)."""
        return self.gan.generate(
            noise,
            embeds,
            height=latent_height,
            width=latent_width,
            num_inference_steps=num_inference_steps,
            truncation_psi=truncation_psi,
            generator=generator,
        )

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (B, 3, H, W) in [-1, 1].

        Non-finite values never become a black image: a decoder computing in half precision (whose
        activations can overflow, as Stable Diffusion's VAE does in float16) retries once with a float32 copy
        of its weights; if that fails too, or the decoder already computes in float32, it is an error.
        """
        images = self.vae(latents.to(self.vae.device, self.vae.dtype))
        if torch.isfinite(images).all():
            return images
        if self.vae.dtype != torch.float32 and not (
            self._offloader is not None and self._offloader.sequential
        ):
            logger.warning("The decoder overflowed in %s; decoding again in float32.", self.vae.dtype)
            images = precision.float32_copy(self.vae)(latents.to(self.vae.device, torch.float32))
            if torch.isfinite(images).all():
                return images
        raise FloatingPointError(
            f"The decoder produced NaN or infinite values (computing in {self.vae.dtype}). If the latents are "
            "finite, the decoder's weights may be broken; with half precision, load the pipeline with "
            "dtype=torch.float32 or dtype=torch.bfloat16."
        )

    def postprocess(
        self, images: torch.Tensor, output_type: str
    ) -> list[Image.Image] | np.ndarray | torch.Tensor:
        """Decoded images (or latents) → the requested ``output_type``."""
        if output_type == "latent":
            return images
        unit = to_unit_range(images)
        if output_type == "pt":
            return unit
        array = to_numpy(unit)
        return array if output_type == "np" else numpy_to_pil(array)


# ---------------------------------------------------------------------------------------------------------
# model_index.json


def read_model_index(root: Path) -> dict[str, Any]:
    """Read ``root/model_index.json``.

    Raises:
        OSError: missing or not JSON.
    """
    path = root / MODEL_INDEX_NAME
    if not path.is_file():
        raise OSError(
            f"{path} does not exist: a pipeline folder needs a model_index.json and one subfolder per component. "
            "To load a single component, use its own class (e.g. VAEDecoder.from_pretrained)."
        )
    index = read_json(path)
    if not isinstance(index, dict):
        raise OSError(f"{path} must hold a JSON object.")
    return index


def pipeline_layout(root: Path, index: dict[str, Any], names: list[str]) -> dict[str, tuple[str, type[Any]]]:
    """Where the components ``names`` of a pipeline folder live and which classes load them:
    ``{name: (subfolder, class)}``.

    Raises:
        OSError, ValueError: a component is missing, or the folder is a pipeline txt2img cannot run.
    """
    path = root / MODEL_INDEX_NAME
    class_name = index.get("_class_name")
    if class_name in DIFFUSERS_PIPELINES:
        for subfolder, _ in DIFFUSERS_LAYOUT.values():
            entry = index.get(subfolder)
            if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
                raise OSError(f"{path} lists no {subfolder!r} component, which a {class_name} needs.")
        skipped = [
            k
            for k in ("safety_checker", "feature_extractor", "image_encoder")
            if index.get(k) not in (None, [None, None])
        ]
        if skipped:
            logger.info("%s: not loading %s (txt2img runs without them).", path, ", ".join(skipped))
        return {name: DIFFUSERS_LAYOUT[name] for name in names}
    if class_name not in (None, "Txt2ImgPipeline"):
        raise ValueError(
            f"{path} describes a {class_name}, which txt2img cannot run; it loads Txt2ImgPipeline folders and "
            f"diffusers' {', '.join(DIFFUSERS_PIPELINES)} folders (SD-Turbo, SDXS, Stable Diffusion 1.x/2.x)."
        )
    return {name: (name, component_class_for(root, index, name)) for name in names}


def component_class_for(root: Path, index: dict[str, Any], name: str) -> type[Any]:
    """The class ``model_index.json`` names for component ``name``.

    Raises:
        OSError: the component is not listed.
        ValueError: the class is not one txt2img knows.
    """
    path = root / MODEL_INDEX_NAME
    entry = index.get(name)
    if entry is None or entry == [None, None]:
        raise OSError(f"{path} lists no {name!r} component; pass one as from_pretrained(..., {name}=...).")
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise ValueError(f"{path}: the entry for {name!r} must be [library, class], got {entry!r}.")
    library, class_name = entry
    if library != "txt2img" or class_name not in COMPONENT_CLASSES:
        raise ValueError(
            f"{path}: component {name!r} is a {library}.{class_name}, which txt2img cannot load; "
            f"known classes: {sorted(COMPONENT_CLASSES)}."
        )
    return COMPONENT_CLASSES[class_name]

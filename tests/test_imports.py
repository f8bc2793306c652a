"""``import txt2img`` stays light: no optional extra is ever imported, heavy dependencies only when used."""

from __future__ import annotations

import subprocess
import sys

EXTRAS = ("diffusers", "pytest", "mkdocs", "accelerate", "hypothesis")


def imported_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    return set(result.stdout.split())


def test_plain_import_pulls_in_nothing_heavy() -> None:
    modules = imported_after("import txt2img")
    assert not {"torch", "transformers", "huggingface_hub"} & modules


def test_public_classes_import_no_extra() -> None:
    modules = imported_after(
        "from txt2img import TextEncoder, VAEDecoder, GANGenerator, Txt2ImgPipeline\nimport txt2img.cli"
    )
    assert "torch" in modules
    assert not {m for m in modules if m.split(".")[0] in EXTRAS}


def test_public_names() -> None:
    import txt2img

    for name in ("TextEncoder", "VAEDecoder", "GANGenerator", "Txt2ImgPipeline", "__version__"):
        assert name in dir(txt2img)
        assert getattr(txt2img, name) is not None

"""Generate one image from a prompt, offline, with the embedded default model (or any other).

    python examples/quickstart.py [PROMPT] [MODEL]

MODEL is a Hub repo id or a local folder written by ``Txt2ImgPipeline.save_pretrained``.
"""

import sys

import torch

from txt2img import DEFAULT_MODEL, Txt2ImgPipeline

prompt = sys.argv[1] if len(sys.argv) > 1 else "a large red circle in the top left corner on a blue background"
model = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_MODEL
pipe = Txt2ImgPipeline.from_pretrained(model)
image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]
image.save("quickstart.png")
print("wrote quickstart.png")

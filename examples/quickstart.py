"""Generate one image from a prompt, offline, with the embedded default model (or any other).

    python examples/quickstart.py [PROMPT] [MODEL]

MODEL is a Hub repo id or a local folder written by ``Txt2ImgPipeline.save_pretrained``. Writes
quickstart.png, which carries the prompt, seed, size, steps and model (``txt2img --from-png quickstart.png``
makes it again).
"""

import sys

import torch

from txt2img import DEFAULT_MODEL, Txt2ImgPipeline

DEFAULT_PROMPT = "a large red circle in the top left corner on a blue background"
prompt = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PROMPT
model = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_MODEL
pipe = Txt2ImgPipeline.from_pretrained(model)
output = pipe(prompt, generator=torch.Generator().manual_seed(0))
output.save("quickstart.png")
print("wrote quickstart.png")

"""Generate one image from a prompt.

    python examples/quickstart.py MODEL [PROMPT]

MODEL is a Hub repo id or a local folder written by ``Txt2ImgPipeline.save_pretrained``.
"""

import sys

import torch

from txt2img import Txt2ImgPipeline

model = sys.argv[1]
prompt = sys.argv[2] if len(sys.argv) > 2 else "a red circle on a blue background"
pipe = Txt2ImgPipeline.from_pretrained(model)
image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]
image.save("quickstart.png")
print("wrote quickstart.png")

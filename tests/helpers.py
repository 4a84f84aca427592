"""Helpers shared by the tests."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def document_image(width: int, height: int, seed: int) -> Image.Image:
    """A page-like image: light background, dark text-like strokes, some noise."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (245, 244, 240))
    draw = ImageDraw.Draw(image)
    for y in range(4, height - 8, 14):
        x = 4
        while x < width - 10:
            word = int(rng.integers(8, 40))
            draw.rectangle([x, y, min(x + word, width - 4), y + 7], fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
            x += word + int(rng.integers(4, 10))
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype("uint8"))


def reference_generate(processor, model, image, text, max_new_tokens):
    import torch

    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    generated = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    if generated and generated[-1] in eos:
        generated = generated[:-1]
    return generated, inputs

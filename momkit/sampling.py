"""``momkit sample``: images (or any span of one modality) drawn by a trained model after text prompts.

Each prompt is text of the model's text modality, written as UTF-8 bytes, or by the text encoder of the data
when it has one (a tokenizer the data was converted with); after its last token the schedule asks for one item
of the target modality (``count`` positions, an image's for a dataset that can decode images), which
:func:`momkit.generation.generate` samples: token by token for a discrete modality (VQ codes), as one denoised
span for a continuous one (latents). Where the spec's dataset has a decoder for the target modality (the
built-in ``shapes`` has one for its image stream), the samples are drawn as pixels into a PNG grid, one row
per prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from momkit.batch import Batch
from momkit.errors import SpecError
from momkit.generation import Denoising, ModalitySchedule, ScheduleRule, generate
from momkit.model import Model
from momkit.registry import get_registry

BYTES = 256


@dataclass
class Samples:
    """What :func:`sample` drew.

    Attributes:
        prompts: The prompts, one per row of the grid.
        modality: Name of the sampled modality.
        values: ``(len(prompts) * per_prompt, count)`` tokens or ``(..., count, latent_dim)`` latents, prompt by
            prompt.
        images: ``(n, height, width, 3)`` uint8 of the values, where the dataset decodes the modality; else
            ``None``.
        per_prompt: Samples of each prompt.
    """

    prompts: list[str]
    modality: str
    values: torch.Tensor
    images: np.ndarray | None
    per_prompt: int


def _prompts(model: Model, prompts: list[str], codecs: dict) -> tuple[int, list[list[int]]]:
    """The text modality's id and each prompt's token ids: by the data's text encoder, else UTF-8 bytes."""
    for i, m in enumerate(model.modalities):
        if m.discrete and m.kind == "text" and m.name in codecs:
            return i, [[int(t) for t in codecs[m.name].encode([p])[0]] for p in prompts]
    for i, m in enumerate(model.modalities):
        if m.discrete and m.kind == "text" and m.vocab_size >= BYTES:
            return i, [list(p.encode()) for p in prompts]
    raise SpecError(f"momkit sample writes prompts as UTF-8 bytes and needs a text modality of vocab_size >= "
                    f"{BYTES}; this model's modalities: {', '.join(m.name for m in model.modalities)}")


def _decoders(model: Model) -> dict:
    dataset = model.spec.dataset()
    describe = get_registry().get("dataset", dataset.kind)
    return describe.decoders(dataset, model.modalities) if describe.decoders is not None else {}


def _target(model: Model, name: str | None, count: int | None, codecs: dict):
    """``(modality name, positions per item, decoder or None)``."""
    dataset = model.spec.dataset()
    decoders = {name: d for name, d in codecs.items() if hasattr(d, "length")}
    names = [m.name for m in model.modalities]
    if name is None:
        if not decoders:
            raise SpecError(f"dataset {dataset.kind!r} decodes none of this model's modalities; name the "
                            f"modality to sample with --modality (one of {', '.join(names)}) and --count")
        name = next(iter(decoders))
    if name not in names:
        raise SpecError(f"--modality {name!r} is not a modality of this model; its modalities: {', '.join(names)}")
    decoder = decoders.get(name)
    if count is None:
        if decoder is None:
            raise SpecError(f"give --count, the positions of one {name!r} item: dataset {dataset.kind!r} has no "
                            f"decoder for it")
        count = decoder.length
    elif decoder is not None and count != decoder.length:
        raise SpecError(f"--count {count} does not fit the decoder of {name!r}, which draws items of "
                        f"{decoder.length} positions; valid: {decoder.length}")
    return name, count, decoder


def sample(model: Model, prompts: list[str], *, per_prompt: int = 1, modality: str | None = None,
           count: int | None = None, temperature: float = 1.0, denoising: Denoising | None = None,
           seed: int = 0) -> Samples:
    """Draw ``per_prompt`` items of ``modality`` (by default the one the dataset decodes) after each prompt."""
    if not prompts or any(not p for p in prompts):
        raise SpecError(f"give at least one non-empty prompt, got {prompts!r}")
    if per_prompt < 1:
        raise SpecError(f"per_prompt must be a positive int, got {per_prompt}")
    codecs = _decoders(model)
    text, ids = _prompts(model, prompts, codecs)
    name, count, decoder = _target(model, modality, count, codecs)
    encoded = [e for e in ids for _ in range(per_prompt)]
    length = max(map(len, encoded))
    device = next(model.parameters()).device
    tokens = torch.tensor([e + [0] * (length - len(e)) for e in encoded], device=device)
    lengths = torch.tensor([len(e) for e in encoded], device=device)
    schedule = ModalitySchedule(default=model.modalities[text].name, rules=tuple(
        ScheduleRule(after=model.modalities[text].name, after_token=b, then=name, count=count)
        for b in sorted({e[-1] for e in encoded})))
    model.eval()
    result = generate(model, Batch(modality=torch.full_like(tokens, text), tokens=tokens), count,
                      prompt_lengths=lengths, temperature=temperature, schedule=schedule,
                      generator=torch.Generator().manual_seed(seed), denoising=denoising)
    where = torch.arange(result.tokens.shape[1], device=device)[None] >= lengths[:, None]
    where &= torch.arange(result.tokens.shape[1], device=device)[None] < result.lengths[:, None]
    config = model.modalities[[m.name for m in model.modalities].index(name)]
    picked = result.tokens[where] if config.discrete else result.latents[name][where]
    values = picked.view(len(encoded), count, *picked.shape[1:])
    images = None if decoder is None else decoder.decode(values.cpu().numpy())
    return Samples(prompts=list(prompts), modality=name, values=values.cpu(), images=images, per_prompt=per_prompt)


def grid(images: np.ndarray, columns: int, scale: int = 8, gap: int = 2) -> np.ndarray:
    """``(n, h, w, 3)`` images -> one ``(rows * (h s + gap) - gap, ...)`` image, ``columns`` per row, each pixel
    scaled to ``scale`` x ``scale``, on grey."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    out = np.full((rows * (h * scale + gap) - gap, columns * (w * scale + gap) - gap, 3), 128, dtype=np.uint8)
    for i, image in enumerate(big):
        r, c = divmod(i, columns)
        out[r * (h * scale + gap):r * (h * scale + gap) + h * scale,
            c * (w * scale + gap):c * (w * scale + gap) + w * scale] = image
    return out


def write(samples: Samples, out: str | Path) -> list[Path]:
    """Write ``samples.jsonl`` (each sample's prompt and values) and, with images, ``samples.png`` (a row per
    prompt) into ``out``; returns the paths written."""
    import matplotlib.image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = out / "samples.jsonl"
    with open(lines, "w") as f:
        for i, values in enumerate(samples.values):
            record = {"prompt": samples.prompts[i // samples.per_prompt], "modality": samples.modality,
                      "values": values.tolist()}
            f.write(json.dumps(record) + "\n")
    written = [lines]
    if samples.images is not None:
        picture = out / "samples.png"
        matplotlib.image.imsave(picture, grid(samples.images, samples.per_prompt))
        written.append(picture)
    return written

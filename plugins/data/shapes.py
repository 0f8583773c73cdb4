"""The ``shapes`` dataset: procedurally generated captioned images with spoken captions; no download.

Document ``i`` of a split is drawn from ``(seed, split, i)`` alone:

- a *scene*: one to ``max_shapes`` shapes (circle, square, triangle, diamond, cross), each with a colour, a
  size and a position, drawn in order on a black ``image_size`` x ``image_size`` RGB image;
- its *caption*, ASCII bytes ending in ``.``: ``a large red circle at the top left and a small blue cross in
  the centre.``;
- its *spoken caption*: a waveform in which each character is a tone of its own pitch (a space is silence),
  stretched over ``speech_length`` frames, each frame's log spectrum quantised to a speech unit.

The streams ``text``, ``image`` and ``speech`` fill the spec's modalities of those kinds, or those that
``streams`` names; a stream without a modality is left out. A document is its caption then its image (image
then caption with probability ``image_first``), then its speech. Every segment but the caption has a fixed
length: ``(image_size / patch_size)^2`` image tokens or latents, ``speech_length`` speech units.

Images become tokens by a k-means codebook (the image modality's ``vocab_size`` codes) of the non-overlapping
``patch_size`` x ``patch_size`` patches of the first ``codebook_documents`` training documents, or continuous
latents by a PCA of the same patches (pixels scaled to [0, 1], the mean removed, the first ``latent_dim``
components, divided by one common scale so that they average unit variance). Speech units are a k-means
codebook of the frames of the same documents. Each is fitted once and cached under ``cache_dir``, in a file
named by a hash of everything it depends on; the k-means is exact (:mod:`momkit.plugins.data.kmeans`), so the
tokens are the same on every machine.

Train and eval never share a document: a caption belongs to the eval split when its hash says so (one caption
in ``EVAL_SHARE``), and each split draws a document's scene again until the caption is one of its own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from dataclasses import dataclass
from itertools import count, product
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from momkit.errors import SpecError
from momkit.plugins.data import kmeans
from momkit.plugins.data.encoders import patchify, unpatchify
from momkit.plugins.data.packing import (Chunk, PackedSource, Piece, StreamLayout, StridedLayout, check_split,
                                         keyed_seed, segment)
from momkit.spec import DatasetConfig, ModalityConfig

VERSION = 1
"""Version of the generator, part of every cache key: bump it when a change alters the documents."""

STREAMS = ("text", "image", "speech")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 230), "yellow": (240, 220, 30),
           "purple": (140, 50, 200), "orange": (250, 130, 20), "white": (245, 245, 245), "pink": (250, 120, 180)}
SIZES = {"small": 0.125, "medium": 0.2, "large": 0.3}
"""Half-width of a shape as a fraction of the image side."""
PLACES = (("at the top left", "at the top", "at the top right"),
          ("on the left", "in the centre", "on the right"),
          ("at the bottom left", "at the bottom", "at the bottom right"))
EVAL_SHARE = 8
"""One caption in this many belongs to the eval split."""
SAMPLE_RATE = 8000
FRAME = 128
"""Samples per speech frame (16 ms)."""
TEXT_VOCAB = 256


class ShapesConfig(DatasetConfig):
    """Procedurally generated captioned images with spoken captions (built in, no download)."""

    image_size: int = Field(16, ge=4, description="Side of the square RGB images, in pixels.")
    patch_size: int = Field(4, ge=1, description="Side of the non-overlapping square patches that become one "
                                                 "image token or latent each; divides `image_size`.")
    max_shapes: int = Field(2, ge=1, le=3, description="Most shapes in an image (each has 1 to this many).")
    image_first: float = Field(0.2, ge=0, le=1, description="Probability that a document puts its image before "
                                                            "its caption.")
    speech_length: int = Field(32, ge=1, description="Speech units of a spoken caption.")
    num_documents: int | None = Field(None, ge=1, description="Documents of the train split; `null`: endless, "
                                                              "generated on the fly.")
    eval_documents: int = Field(256, ge=1, description="Documents of the eval split.")
    codebook_documents: int = Field(1024, ge=1, description="Training documents whose image patches and speech "
                                                            "frames fit the codebooks and the PCA.")
    kmeans_iterations: int = Field(20, ge=1, description="Most Lloyd iterations of a k-means fit.")
    cache_dir: str | None = Field(None, description="Directory of the fitted codebooks; `null`: `$MOMKIT_CACHE`, "
                                                    "else `~/.cache/momkit`.")
    streams: dict[str, str | None] = Field(
        default_factory=dict, description="Modality (by name) that a stream (`text`, `image`, `speech`) fills, "
                                          "where its kind alone does not say; `null` leaves the stream out.")

    @field_validator("streams")
    @classmethod
    def _known_streams(cls, value: dict[str, str | None]) -> dict[str, str | None]:
        unknown = [s for s in value if s not in STREAMS]
        if unknown:
            raise SpecError(f"streams names {', '.join(map(repr, unknown))}, not a stream of shapes; its "
                            f"streams: {', '.join(STREAMS)}")
        return value

    @model_validator(mode="after")
    def _patches_tile(self) -> ShapesConfig:
        if self.image_size % self.patch_size:
            divisors = [str(d) for d in range(1, self.image_size + 1) if self.image_size % d == 0]
            raise SpecError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}; its "
                            f"divisors: {', '.join(divisors)}")
        return self


@dataclass(frozen=True)
class Scene:
    """What one document shows and says, before it becomes tokens.

    Attributes:
        shapes: ``(shape, colour, size, x, y)`` of each shape in drawing order: indices into ``SHAPES``,
            ``COLOURS`` and ``SIZES``, and the pixel of its centre.
        image_first: Whether the image comes before the caption.
        caption: The caption, ending in ``.``.
    """

    shapes: tuple[tuple[int, int, int, int, int], ...]
    image_first: bool
    caption: str


def place(x: int, y: int, image_size: int) -> str:
    """Where pixel ``(x, y)`` is, in words: the cell of a 3 x 3 grid."""
    return PLACES[3 * y // image_size][3 * x // image_size]


def describe(shapes: Sequence[tuple[int, int, int, int, int]], image_size: int) -> str:
    """The caption of ``shapes``: ``a large red circle at the top left and a small blue cross in the centre.``"""
    phrases = [f"a {list(SIZES)[size]} {list(COLOURS)[colour]} {SHAPES[shape]} {place(x, y, image_size)}"
               for shape, colour, size, x, y in shapes]
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0]
    return listed + "."


def shortest_caption(image_size: int) -> str:
    """The shortest caption of any scene: one shape, described in the shortest words."""
    def shortest(words: Sequence[str]) -> int:
        return min(range(len(words)), key=lambda i: len(words[i]))

    x, y = min(product(range(image_size), repeat=2), key=lambda p: len(place(*p, image_size)))
    return describe(((shortest(SHAPES), shortest(list(COLOURS)), shortest(list(SIZES)), x, y),), image_size)


def draw_scene(config: ShapesConfig, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``, drawn from ``(config.seed, split, index)`` alone."""
    size = config.image_size
    for attempt in count():
        rng = random.Random(keyed_seed("shapes", config.seed, split, index, attempt))
        n = rng.randint(1, config.max_shapes)
        shapes = tuple((rng.randrange(len(SHAPES)), rng.randrange(len(COLOURS)), rng.randrange(len(SIZES)),
                        rng.randrange(size), rng.randrange(size)) for _ in range(n))
        caption = describe(shapes, size)
        if (keyed_seed("eval", config.seed, caption) % EVAL_SHARE == 0) == (split == "eval"):
            return Scene(shapes, rng.random() < config.image_first, caption)


def render(scenes: Sequence[Scene], image_size: int) -> np.ndarray:
    """``(n, s, s, 3)`` uint8 images of ``scenes``: shapes in flat colours on black, later ones on top."""
    y, x = np.mgrid[:image_size, :image_size]
    radii = np.array([max(1, round(f * image_size)) for f in SIZES.values()])
    rgb = np.array(list(COLOURS.values()), dtype=np.uint8)
    images = np.zeros((len(scenes), image_size, image_size, 3), dtype=np.uint8)
    for slot in range(max(len(s.shapes) for s in scenes)):
        rows = np.array([i for i, s in enumerate(scenes) if len(s.shapes) > slot])
        shape, colour, size, cx, cy = np.array([scenes[i].shapes[slot] for i in rows]).T
        r = radii[size][:, None, None]
        dx, dy = np.abs(x - cx[:, None, None]), y - cy[:, None, None]
        ady = np.abs(dy)
        inside = np.stack([dx ** 2 + dy ** 2 <= (r + 0.5) ** 2,
                           np.maximum(dx, ady) <= r,
                           (ady <= r) & (2 * dx <= dy + r),
                           dx + ady <= r,
                           (np.maximum(dx, ady) <= r) & (3 * np.minimum(dx, ady) <= r)])
        mask = inside[shape, np.arange(len(rows))]
        images[rows] = np.where(mask[..., None], rgb[colour][:, None, None, :], images[rows])
    return images


def patches(images: np.ndarray, patch_size: int) -> np.ndarray:
    """``(n, g * g, p * p * 3)`` float64 pixel values of the non-overlapping patches of ``images (n, s, s, 3)``,
    in raster order (``g = s / p``)."""
    return patchify(images, patch_size).astype(np.float64)


def speech_features(caption: str, length: int) -> np.ndarray:
    """``(length, FRAME / 2 + 1)`` integer-valued log spectra of the frames of the spoken ``caption``.

    Character ``k`` of ``n`` voices samples ``[k T / n, (k + 1) T / n)`` of ``T = length * FRAME`` with a sine of
    ``150 + 35 (c - 32)`` Hz for character code ``c`` (a space is silence); a frame's feature is
    ``round(8 log(1 + |rfft(frame * hann)|))``.
    """
    codes = np.frombuffer(caption.encode(), dtype=np.uint8).astype(np.float64)
    samples = length * FRAME
    voiced = codes[np.arange(samples) * len(codes) // samples]
    wave = np.where(voiced == 32, 0.0, np.sin(2 * np.pi * (150 + 35 * (voiced - 32)) * np.arange(samples)
                                              / SAMPLE_RATE))
    spectra = np.abs(np.fft.rfft(wave.reshape(length, FRAME) * np.hanning(FRAME), axis=-1))
    return np.round(8 * np.log1p(spectra))


def _stream_modalities(streams: dict[str, str | None], modalities: Sequence[ModalityConfig]) -> dict[str, int]:
    """``{stream: modality id}`` of the streams that the spec's modalities take."""
    names = [m.name for m in modalities]
    ids = {}
    for stream in STREAMS:
        if stream in streams:
            name = streams[stream]
            if name is not None and name not in names:
                raise SpecError(f"data.streams maps stream {stream!r} to {name!r}, not a modality of the spec; "
                                f"its modalities: {', '.join(names)}")
            if name is not None:
                ids[stream] = names.index(name)
            continue
        same = [i for i, m in enumerate(modalities) if m.kind == stream]
        if len(same) > 1:
            listed = ", ".join(names[i] for i in same)
            raise SpecError(f"the spec has {len(same)} modalities of kind {stream!r} ({listed}); say which one "
                            f"the shapes {stream} stream fills with data.streams, e.g. "
                            f"streams: {{{stream}: {names[same[0]]}}} (null leaves the stream out)")
        if same:
            ids[stream] = same[0]
    shared = sorted({names[i] for i in ids.values() if list(ids.values()).count(i) > 1})
    if shared:
        raise SpecError(f"data.streams sends two streams of shapes to modality {shared[0]!r}; a modality takes "
                        f"one stream")
    if not ids:
        listed = ", ".join(f"{m.name} ({m.kind})" for m in modalities)
        raise SpecError(f"shapes fills modalities of kind {', '.join(STREAMS)} (or those data.streams names); "
                        f"the spec has none of them: {listed}")
    for stream, i in ids.items():
        m = modalities[i]
        if stream != "image" and not m.discrete:
            raise SpecError(f"the shapes {stream} stream is discrete; modality {m.name!r} is continuous "
                            f"(latent_dim {m.latent_dim}): give it a vocab_size, or map the stream elsewhere")
        if stream == "text" and m.vocab_size < TEXT_VOCAB:
            raise SpecError(f"the shapes text stream is bytes (ids 0..255) and needs vocab_size >= 256; "
                            f"modality {m.name!r} has vocab_size {m.vocab_size}")
    return ids


def _cache_root(config: ShapesConfig) -> Path:
    return Path(config.cache_dir or os.environ.get("MOMKIT_CACHE") or "~/.cache/momkit").expanduser() / "shapes"


def _key(config: ShapesConfig, artifact: str, size: int) -> dict:
    """Everything ``artifact`` (of ``size`` codes or latent dimensions) depends on."""
    key = {"artifact": artifact, "size": size, "version": VERSION, "seed": config.seed,
           "image_size": config.image_size, "max_shapes": config.max_shapes, "documents": config.codebook_documents}
    if artifact.startswith("image"):
        key["patch_size"] = config.patch_size
    else:
        key["speech_length"] = config.speech_length
    if artifact.endswith("codebook"):
        key["iterations"] = config.kmeans_iterations
    return key


def _cached(directory: Path, key: dict, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays stored under ``key`` in ``directory``, computed and written (atomically) if missing."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = directory / f"{key['artifact']}-{digest}.npz"
    if not path.exists():
        arrays = compute()
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        with open(partial, "wb") as f:
            np.savez(f, **arrays)
        os.replace(partial, path)
    with np.load(path) as stored:
        return dict(stored)


def _sample(config: ShapesConfig) -> list[Scene]:
    """The training scenes the codebooks and the PCA are fitted on."""
    return [draw_scene(config, "train", i) for i in range(config.codebook_documents)]


def _sample_patches(config: ShapesConfig) -> np.ndarray:
    """``(n, p * p * 3)`` pixel values of every patch of the sample's images."""
    values = patches(render(_sample(config), config.image_size), config.patch_size)
    return values.reshape(-1, values.shape[-1])


def _fit_image_codebook(config: ShapesConfig, codes: int) -> dict[str, np.ndarray]:
    points = torch.from_numpy(_sample_patches(config))
    return {"codebook": kmeans.fit(points, codes, config.kmeans_iterations, keyed_seed("image", config.seed)).numpy()}


def _fit_image_pca(config: ShapesConfig, dim: int) -> dict[str, np.ndarray]:
    """Mean ``(d,)``, projection ``(d, dim)`` and scale ``()`` of the first ``dim`` principal components of the
    sample's patches, pixels scaled to [0, 1]; each component's sign makes its largest entry positive."""
    points = _sample_patches(config) / 255
    mean = points.mean(0)
    centred = points - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / len(points))
    values, vectors = values[::-1][:dim], vectors[:, ::-1][:, :dim]
    vectors = vectors * np.sign(vectors[np.abs(vectors).argmax(0), np.arange(dim)])
    return {"mean": mean, "projection": vectors, "scale": np.sqrt(max(float(values.mean()), 1e-12))}


def _fit_speech_codebook(config: ShapesConfig, codes: int) -> dict[str, np.ndarray]:
    frames = np.concatenate([speech_features(s.caption, config.speech_length) for s in _sample(config)])
    return {"codebook": kmeans.fit(torch.from_numpy(frames), codes, config.kmeans_iterations,
                                   keyed_seed("speech", config.seed)).numpy()}


@dataclass(frozen=True)
class ImageCodec:
    """The images of one image modality as its tokens (a k-means ``codebook``) or latents (a ``pca``), and back.

    Attributes:
        image_size: Side of the images, in pixels.
        patch_size: Side of a patch, one position.
        codebook: ``(codes, p * p * 3)`` pixel values of each code, or ``None`` for latents.
        pca: ``{mean, projection, scale}`` of the latents (see :func:`_fit_image_pca`), or ``None`` for tokens.
    """

    image_size: int
    patch_size: int
    codebook: torch.Tensor | None = None
    pca: dict[str, np.ndarray] | None = None

    @property
    def length(self) -> int:
        """Positions of one image."""
        return (self.image_size // self.patch_size) ** 2

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``(n, s, s, 3)`` uint8 images -> ``(n, length)`` int64 codes or ``(n, length, latent_dim)`` float32."""
        values = patches(images, self.patch_size)
        n, per_image, width = values.shape
        if self.codebook is not None:
            return kmeans.nearest(torch.from_numpy(values.reshape(-1, width)), self.codebook).view(n, per_image).numpy()
        pca = self.pca
        return ((values / 255 - pca["mean"]) @ pca["projection"] / pca["scale"]).astype(np.float32)

    def decode(self, values: np.ndarray) -> np.ndarray:
        """Codes or latents as :meth:`encode` gives them -> ``(n, s, s, 3)`` uint8 images."""
        if self.codebook is not None:
            pixels = self.codebook.numpy()[np.asarray(values)]
        else:
            pca = self.pca
            pixels = ((np.asarray(values, dtype=np.float64) * pca["scale"]) @ pca["projection"].T + pca["mean"]) * 255
        return unpatchify(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), self.patch_size)


class ShapesStore:
    """The documents of one split of ``shapes``, generated when read."""

    def __init__(self, config: ShapesConfig, modalities: Sequence[ModalityConfig], split: str):
        self.config, self.modalities = config, list(modalities)
        self.ids = _stream_modalities(config.streams, self.modalities)
        self.tokens_per_image = (config.image_size // config.patch_size) ** 2
        self.min_length = self._length(shortest_caption(config.image_size))
        self._scene = functools.lru_cache(maxsize=4096)(functools.partial(draw_scene, config, split))
        root = _cache_root(config)
        if "image" in self.ids:
            image = self.modalities[self.ids["image"]]
            if image.discrete:
                codebook = torch.from_numpy(_cached(root, _key(config, "image-codebook", image.vocab_size),
                                                    lambda: _fit_image_codebook(config, image.vocab_size))["codebook"])
                self.image_codec = ImageCodec(config.image_size, config.patch_size, codebook=codebook)
            else:
                values = 3 * config.patch_size ** 2
                if image.latent_dim > values:
                    raise SpecError(f"modality {image.name!r} has latent_dim {image.latent_dim}, more than the "
                                    f"{values} values of a {config.patch_size}x{config.patch_size} RGB patch; "
                                    f"use latent_dim <= {values} or a larger patch_size")
                pca = _cached(root, _key(config, "image-pca", image.latent_dim),
                              lambda: _fit_image_pca(config, image.latent_dim))
                self.image_codec = ImageCodec(config.image_size, config.patch_size, pca=pca)
        if "speech" in self.ids:
            codes = self.modalities[self.ids["speech"]].vocab_size
            self.speech_codebook = torch.from_numpy(_cached(root, _key(config, "speech-codebook", codes),
                                                            lambda: _fit_speech_codebook(config, codes))["codebook"])

    def _length(self, caption: str) -> int:
        return (len(caption) * ("text" in self.ids) + self.tokens_per_image * ("image" in self.ids)
                + self.config.speech_length * ("speech" in self.ids))

    def length(self, docs: np.ndarray) -> np.ndarray:
        """``(n,)`` int64 lengths of documents ``docs (n,)``."""
        return np.array([self._length(self._scene(int(d)).caption) for d in docs], dtype=np.int64)

    def read(self, pieces: Sequence[Piece]) -> list[Chunk]:
        """One chunk per piece; each document is generated once per call."""
        docs = sorted({p.doc for p in pieces})
        documents = dict(zip(docs, self._documents([self._scene(d) for d in docs])))
        return [documents[p.doc].cut(p.start, p.stop) for p in pieces]

    def _documents(self, scenes: list[Scene]) -> list[Chunk]:
        """The whole document of each scene: caption, image and speech in its order, as the spec takes them."""
        segments: dict[str, list[Chunk]] = {}
        if "text" in self.ids:
            segments["text"] = [segment(self.ids["text"], np.frombuffer(s.caption.encode(), dtype=np.uint8))
                                for s in scenes]
        if "image" in self.ids:
            segments["image"] = self._images(scenes)
        if "speech" in self.ids:
            frames = np.concatenate([speech_features(s.caption, self.config.speech_length) for s in scenes])
            units = kmeans.nearest(torch.from_numpy(frames), self.speech_codebook).view(len(scenes), -1)
            segments["speech"] = [segment(self.ids["speech"], u) for u in units.numpy()]
        documents = []
        for i, scene in enumerate(scenes):
            order = ("image", "text", "speech") if scene.image_first else ("text", "image", "speech")
            documents.append(Chunk.join([segments[s][i] for s in order if s in segments]))
        return documents

    def _images(self, scenes: list[Scene]) -> list[Chunk]:
        """Each scene's image as a segment of ``tokens_per_image`` codes or latents."""
        modality_id = self.ids["image"]
        encoded = self.image_codec.encode(render(scenes, self.config.image_size))
        if self.modalities[modality_id].discrete:
            return [segment(modality_id, tokens) for tokens in encoded]
        return [segment(modality_id, latents=v) for v in encoded]


def decoders(config: ShapesConfig, modalities: Sequence[ModalityConfig]) -> dict[str, ImageCodec]:
    """``{name: ImageCodec}`` of the modality the image stream fills, if any (what ``momkit sample`` draws)."""
    store = ShapesStore(config, modalities, "train")
    if "image" not in store.ids:
        return {}
    return {modalities[store.ids["image"]].name: store.image_codec}


def build(config: ShapesConfig, modalities: Sequence[ModalityConfig], split: str, seq_len: int) -> PackedSource:
    """The ``split`` of ``shapes`` as batches of ``seq_len`` positions (see the module docstring)."""
    check_split(split, seq_len)
    store = ShapesStore(config, modalities, split)
    text = {modalities[store.ids["text"]].name: np.ones(modalities[store.ids["text"]].vocab_size, dtype=np.int64)
            } if "text" in store.ids else {}
    documents = config.num_documents if split == "train" else config.eval_documents
    if documents is None:
        return PackedSource(modalities, seq_len, store, StridedLayout(store.length, seq_len, store.min_length), text)
    offsets = np.concatenate([[0], np.cumsum(store.length(np.arange(documents)))])
    layout = StreamLayout(offsets, seq_len, name=f"the {split} split of shapes ({documents} documents)")
    return PackedSource(modalities, seq_len, store, layout, text)

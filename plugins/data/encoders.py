"""Built-in encoders: raw text, images and audio to a modality's tokens or latents, and back where possible.

A modality names its encoder in the spec; ``momkit convert`` fits it where it needs fitting (a BPE tokenizer,
a k-means codebook), keeps what it fitted beside the shards, and encodes the raw items in batches::

    modalities:
      - {kind: text, vocab_size: 4096, encoder: {kind: hf_tokenizer, train_size: 4096}}
      - {kind: image, vocab_size: 512, encoder: {kind: vq, codes: 512, image_size: 32, patch_size: 4}}
      - {kind: speech, vocab_size: 256, encoder: {kind: units, codes: 256}}

Text: ``bytes`` (UTF-8, 256 ids) and ``hf_tokenizer`` (a Hugging Face ``tokenizers`` file or hub name, or a
byte-level BPE trained on the input). Images, squared by a centre crop and resized to ``image_size``:
``patches`` (pixels of each patch as a continuous latent), ``vq`` (k-means codes of the patches), and, with
``momkit[diffusers]``, ``vae`` (``AutoencoderKL`` latents, as Transfusion uses) and ``vqmodel`` (``VQModel``
codes, Chameleon-style). Audio: ``logmel`` (log-mel frames as continuous latents) and ``units`` (k-means units
over them, as HuBERT-style units are; a model of your own plugs in as another encoder).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator

from momkit import hookimpl
from momkit.configs import EncoderConfig, divisors
from momkit.descriptors import Encoder
from momkit.errors import SpecError
from momkit.plugins.data import kmeans

BYTES = 256


def _missing(encoder: str, extra: str) -> SpecError:
    return SpecError(f"encoder {encoder!r} needs a library that is not installed: pip install 'momkit[{extra}]'")


class BytesConfig(EncoderConfig):
    """UTF-8 bytes: 256 ids, no tokenizer to fit (MambaByte's input)."""

    def size(self) -> int:
        return BYTES


class BytesCodec:
    fit_items, size = 0, BYTES

    def encode(self, items: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64) for text in items]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(BYTES, dtype=np.int64)


class TokenizerConfig(EncoderConfig):
    """A Hugging Face `tokenizers` tokenizer: a `tokenizer.json` file or a hub name, or a byte-level BPE of
    `train_size` ids trained on the input text (offline)."""

    path: str | None = Field(None, description="A `tokenizer.json` file, or a hub name (needs the network once).")
    train_size: int | None = Field(None, ge=BYTES + 1, description="Train a byte-level BPE of this vocabulary "
                                                                    "size on the input text instead.")
    fit_items: int = Field(100_000, ge=1, description="Texts (the first ones) the BPE is trained on.")

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if (self.path is None) == (self.train_size is None):
            raise SpecError(f"encoder hf_tokenizer needs exactly one of `path` (a tokenizer.json file or hub name) "
                            f"and `train_size` (train a BPE on the input); got path={self.path!r}, "
                            f"train_size={self.train_size!r}")
        return self

    def size(self) -> int | None:
        return self.train_size


class TokenizerCodec:
    FILE = "tokenizer.json"

    def __init__(self, config: TokenizerConfig, directory: Path):
        try:
            import tokenizers
        except ImportError:
            raise _missing("hf_tokenizer", "tokenizers") from None
        self.config, self.directory, self.lib = config, directory, tokenizers
        saved = directory / self.FILE
        if saved.is_file():
            self.tokenizer = tokenizers.Tokenizer.from_file(str(saved))
        elif config.path is None:
            self.tokenizer = None
        elif Path(config.path).is_file():
            self.tokenizer = tokenizers.Tokenizer.from_file(config.path)
        else:
            try:
                self.tokenizer = tokenizers.Tokenizer.from_pretrained(config.path)
            except Exception as exc:
                raise SpecError(f"encoder hf_tokenizer: {config.path!r} is neither a tokenizer.json file nor a "
                                f"hub name that loads ({exc})") from None
        self.fit_items = config.fit_items if self.tokenizer is None else 0

    @property
    def size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def save(self) -> None:
        """Keep a copy of a tokenizer read from ``path``, so that the shards decode without it."""
        if self.tokenizer is not None and not (self.directory / self.FILE).is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(str(self.directory / self.FILE))

    def fit(self, items: Sequence[str]) -> None:
        lib = self.lib
        tokenizer = lib.Tokenizer(lib.models.BPE())
        tokenizer.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = lib.decoders.ByteLevel()
        trainer = lib.trainers.BpeTrainer(vocab_size=self.config.train_size, show_progress=False,
                                          initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(items, trainer=trainer)
        self.tokenizer = tokenizer
        self.directory.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(self.directory / self.FILE))

    def encode(self, items: Sequence[str]) -> list[np.ndarray]:
        return [np.array(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(list(items))]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each id: a byte-level token's characters are one byte each; other tokens are decoded;
        special tokens have none."""
        alphabet = set(self.lib.pre_tokenizers.ByteLevel.alphabet())
        special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        counts = np.zeros(self.size, dtype=np.int64)
        for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            counts[i] = len(token) if set(token) <= alphabet else len(self.tokenizer.decode([i]).encode())
        return counts


def square(image, size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8 RGB of ``image`` (a PIL image or an ``(h, w, 3)`` uint8 array): its centre square,
    resized."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)


def patchify(images: np.ndarray, p: int) -> np.ndarray:
    """``(n, g * g, p * p * 3)`` values of the patches of ``images (n, s, s, 3)`` in raster order."""
    n, s = images.shape[:2]
    g = s // p
    return images.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, p * p * 3)


def unpatchify(values: np.ndarray, p: int) -> np.ndarray:
    """Inverse of :func:`patchify`: ``(n, g * g, p * p * 3)`` -> ``(n, g p, g p, 3)``."""
    n, positions = values.shape[:2]
    g = math.isqrt(positions)
    return values.reshape(n, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * p, g * p, 3)


class PatchesConfig(EncoderConfig):
    """Each patch's pixels as one continuous latent, scaled to [-1, 1]: `3 * patch_size**2` wide."""

    discrete = False

    image_size: int = Field(32, ge=1, description="Side the images are resized to (after a centre crop).")
    patch_size: int = Field(4, ge=1, description="Side of a patch: one position.")

    @model_validator(mode="after")
    def _patches_tile(self) -> PatchesConfig:
        if self.image_size % self.patch_size:
            raise SpecError(f"encoder {self.kind}: patch_size {self.patch_size} does not divide image_size "
                            f"{self.image_size}; valid: {', '.join(map(str, divisors(self.image_size)))}")
        return self

    def size(self) -> int:
        return 3 * self.patch_size ** 2


class PatchesCodec:
    fit_items = 0

    def __init__(self, config: PatchesConfig):
        self.config, self.size = config, config.size()
        self.length = (config.image_size // config.patch_size) ** 2

    def pixels(self, items) -> np.ndarray:
        return patchify(np.stack([square(item, self.config.image_size) for item in items]), self.config.patch_size)

    def encode(self, items) -> list[np.ndarray]:
        return list((self.pixels(items) / 127.5 - 1).astype(np.float32))

    def decode(self, values) -> np.ndarray:
        pixels = np.clip(np.rint((np.asarray(values, dtype=np.float64) + 1) * 127.5), 0, 255)
        return unpatchify(pixels.astype(np.uint8), self.config.patch_size)


class CodebookConfig(EncoderConfig):
    """A k-means codebook of `codes` entries fitted on the first `fit_items` items (exact and reproducible:
    :mod:`momkit.plugins.data.kmeans`)."""

    discrete = True

    codes: int = Field(1024, ge=2, description="Codebook size: the modality's vocabulary.")
    fit_items: int = Field(1000, ge=1, description="Items (the first ones) the codebook is fitted on.")
    iterations: int = Field(20, ge=1, description="Lloyd iterations of the fit.")
    seed: int = Field(0, description="Seed of the codebook's initial entries.")

    def size(self) -> int:
        return self.codes


class Codebook:
    """A codec's k-means codebook, kept in its directory: loaded when fitted before, else fitted on the
    ``points(items)`` of its first items."""

    FILE = "codebook.npy"

    def open_codebook(self, config: CodebookConfig, directory: Path, device: torch.device) -> None:
        self.codebook_config, self.directory, self.device, self.size = config, directory, device, config.codes
        saved = directory / self.FILE
        self.codebook = torch.from_numpy(np.load(saved)) if saved.is_file() else None
        self.fit_items = config.fit_items if self.codebook is None else 0

    def fit(self, items) -> None:
        c = self.codebook_config
        self.codebook = kmeans.fit(self.points(items), c.codes, c.iterations, c.seed)
        self.directory.mkdir(parents=True, exist_ok=True)
        np.save(self.directory / self.FILE, self.codebook.numpy())

    def nearest(self, points: torch.Tensor) -> np.ndarray:
        return kmeans.nearest(points.double().to(self.device), self.codebook.to(self.device)).cpu().numpy()


class VqConfig(CodebookConfig, PatchesConfig):
    """Each patch as its nearest entry of a k-means codebook of patches fitted on the input's first images."""


class VqCodec(Codebook, PatchesCodec):
    def __init__(self, config: VqConfig, directory: Path, device: torch.device):
        PatchesCodec.__init__(self, config)
        self.open_codebook(config, directory, device)

    def points(self, items) -> torch.Tensor:
        return torch.from_numpy(self.pixels(items).reshape(-1, 3 * self.config.patch_size ** 2)).double()

    def encode(self, items) -> list[np.ndarray]:
        return list(self.nearest(self.points(items)).reshape(len(items), -1))

    def decode(self, values) -> np.ndarray:
        pixels = np.clip(np.rint(self.codebook.numpy()[np.asarray(values)]), 0, 255).astype(np.uint8)
        return unpatchify(pixels, self.config.patch_size)


class DiffusersConfig(EncoderConfig):
    """A `diffusers` autoencoder: a local directory (`save_pretrained`) or a hub name."""

    path: str = Field(description="Directory of the model, or its hub name (needs the network once).")
    image_size: int = Field(256, ge=8, description="Side the images are resized to (after a centre crop).")
    subfolder: str | None = Field(None, description="Subfolder of the model in `path`, e.g. `vae` of a pipeline.")


class VaeConfig(DiffusersConfig):
    """`AutoencoderKL` latents (the posterior's mean times the scaling factor), `latent_patch`^2 latent
    pixels per position: `latent_channels * latent_patch**2` wide (Transfusion's image input)."""

    discrete = False

    latent_patch: int = Field(1, ge=1, description="Side of the square of latent pixels one position holds.")


class VqModelConfig(DiffusersConfig):
    """`VQModel` codes: one position per latent pixel, the codebook's size as vocabulary (Chameleon-style)."""


def _diffusers_model(config: DiffusersConfig, cls_name: str, device: torch.device):
    try:
        import diffusers
    except ImportError:
        raise _missing(config.kind, "diffusers") from None
    try:
        model = getattr(diffusers, cls_name).from_pretrained(config.path, subfolder=config.subfolder,
                                                             low_cpu_mem_usage=False)
    except Exception as exc:
        raise SpecError(f"encoder {config.kind}: cannot load a {cls_name} from {config.path!r} ({exc})") from None
    return model.to(device).eval()


class _Autoencoder:
    """What the two ``diffusers`` encoders share: images in [-1, 1] in, an ``(n, c, h, w)`` latent grid out."""

    fit_items = 0

    def __init__(self, config: DiffusersConfig, device: torch.device, cls_name: str):
        self.config, self.device = config, device
        self.model = _diffusers_model(config, cls_name, device)
        self.dtype = next(self.model.parameters()).dtype

    def images(self, items) -> torch.Tensor:
        pixels = np.stack([square(item, self.config.image_size) for item in items])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device, self.dtype)
        return x / 127.5 - 1

    @staticmethod
    def pixels(x: torch.Tensor) -> np.ndarray:
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class VaeCodec(_Autoencoder):
    def __init__(self, config: VaeConfig, device: torch.device):
        super().__init__(config, device, "AutoencoderKL")
        self.scale = float(self.model.config.scaling_factor)
        self.p = config.latent_patch
        self.channels = int(self.model.config.latent_channels)
        self.size = self.channels * self.p ** 2
        with torch.no_grad():
            side = self.model.encode(self.images([np.zeros((8, 8, 3), np.uint8)])).latent_dist.mean.shape[-1]
        if side % self.p:
            raise SpecError(f"encoder vae: latent_patch {self.p} does not divide the latent side {side} of "
                            f"image_size {config.image_size}")
        self.grid = side // self.p
        self.length = self.grid ** 2

    @torch.no_grad()
    def encode(self, items) -> list[np.ndarray]:
        z = self.model.encode(self.images(items)).latent_dist.mean * self.scale
        n, c, g, p = z.shape[0], self.channels, self.grid, self.p
        z = z.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
        return list(z.float().cpu().numpy())

    @torch.no_grad()
    def decode(self, values) -> np.ndarray:
        z = torch.as_tensor(np.asarray(values), dtype=self.dtype, device=self.device)
        n, c, g, p = z.shape[0], self.channels, self.grid, self.p
        z = z.reshape(n, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, g * p, g * p)
        return self.pixels(self.model.decode(z / self.scale).sample)


class VqModelCodec(_Autoencoder):
    def __init__(self, config: VqModelConfig, device: torch.device):
        super().__init__(config, device, "VQModel")
        self.size = int(self.model.config.num_vq_embeddings)
        with torch.no_grad():
            self.latent_shape = self.model.encode(self.images([np.zeros((8, 8, 3), np.uint8)])).latents.shape[1:]
        self.length = self.latent_shape[1] * self.latent_shape[2]

    @torch.no_grad()
    def encode(self, items) -> list[np.ndarray]:
        h = self.model.encode(self.images(items)).latents
        codes = self.model.quantize(h)[2][2]
        return list(codes.reshape(len(items), -1).cpu().numpy().astype(np.int64))

    @torch.no_grad()
    def decode(self, values) -> np.ndarray:
        codes = torch.as_tensor(np.asarray(values), dtype=torch.long, device=self.device)
        c, h, w = self.latent_shape
        z = self.model.quantize.get_codebook_entry(codes.reshape(-1), (len(codes), h, w, c))
        return self.pixels(self.model.decode(z, force_not_quantize=True).sample)


class LogMelConfig(EncoderConfig):
    """Log-mel frames of mono audio, one position per hop: `n_mels` wide. A clip at another sample rate is
    resampled (linear interpolation)."""

    discrete = False

    sample_rate: int = Field(16_000, ge=1000, description="Sample rate the audio is brought to.")
    n_mels: int = Field(40, ge=1, description="Mel bands: the latent width.")
    window_ms: float = Field(25.0, gt=0, description="Frame length in milliseconds (Hann window).")
    hop_ms: float = Field(20.0, gt=0, description="Hop between frames in milliseconds: one position per hop.")

    def size(self) -> int:
        return self.n_mels


def mel_filters(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """``(n_mels, n_fft // 2 + 1)`` triangular filters equally spaced on the HTK mel scale up to Nyquist."""
    def mel(hz):
        return 2595 * np.log10(1 + np.asarray(hz) / 700)

    edges = 700 * (10 ** (np.linspace(0, mel(sample_rate / 2), n_mels + 2) / 2595) - 1)
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    rising = (bins[None] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - bins[None]) / (edges[2:, None] - edges[1:-1, None])
    return np.clip(np.minimum(rising, falling), 0, None)


class LogMelCodec:
    fit_items = 0

    def __init__(self, config: LogMelConfig):
        self.config, self.size = config, config.n_mels
        self.window = round(config.window_ms * config.sample_rate / 1000)
        self.hop = round(config.hop_ms * config.sample_rate / 1000)
        self.n_fft = 1 << (self.window - 1).bit_length()
        self.filters = mel_filters(config.n_mels, self.n_fft, config.sample_rate)

    def features(self, clip) -> np.ndarray:
        """``(frames, n_mels)`` float64 log-mel features of one ``(samples, sample_rate)`` clip, scaled as Whisper
        scales them: ``log10`` power, floored 8 below the clip's peak, ``(x + 4) / 4``."""
        samples, rate = clip
        samples = np.asarray(samples, dtype=np.float64)
        if rate != self.config.sample_rate:
            count = max(1, round(len(samples) * self.config.sample_rate / rate))
            samples = np.interp(np.arange(count) * rate / self.config.sample_rate, np.arange(len(samples)), samples)
        if len(samples) < self.window:
            raise SpecError(f"an audio clip of {len(samples)} samples at {self.config.sample_rate} Hz is shorter "
                            f"than one frame ({self.window} samples)")
        frames = np.lib.stride_tricks.sliding_window_view(samples, self.window)[::self.hop]
        power = np.abs(np.fft.rfft(frames * np.hanning(self.window), n=self.n_fft)) ** 2
        logmel = np.log10(np.maximum(power @ self.filters.T, 1e-10))
        return (np.maximum(logmel, logmel.max() - 8) + 4) / 4

    def encode(self, items) -> list[np.ndarray]:
        return [self.features(clip).astype(np.float32) for clip in items]


class UnitsConfig(CodebookConfig, LogMelConfig):
    """Each log-mel frame (on a grid of 1/8) as its nearest entry of a k-means codebook of frames (speech units)
    fitted on the input's first clips."""

    codes: int = Field(512, ge=2, description="Codebook size: the modality's vocabulary.")


class UnitsCodec(Codebook, LogMelCodec):
    def __init__(self, config: UnitsConfig, directory: Path, device: torch.device):
        LogMelCodec.__init__(self, config)
        self.open_codebook(config, directory, device)

    def points(self, items) -> torch.Tensor:
        return torch.cat([torch.from_numpy(np.round(8 * self.features(clip))) for clip in items])

    def encode(self, items) -> list[np.ndarray]:
        return [self.nearest(self.points([clip])) for clip in items]


@hookimpl
def momkit_encoders():
    return [
        Encoder(name="bytes", description="text as UTF-8 bytes (256 ids)", inputs="text", config=BytesConfig,
                open=lambda config, directory, device: BytesCodec()),
        Encoder(name="hf_tokenizer", description="text through a Hugging Face tokenizer, or a BPE trained on the "
                                                 "input (momkit[tokenizers])", inputs="text",
                config=TokenizerConfig, open=lambda config, directory, device: TokenizerCodec(config, directory)),
        Encoder(name="patches", description="image patches' pixels as continuous latents", inputs="image",
                config=PatchesConfig, open=lambda config, directory, device: PatchesCodec(config)),
        Encoder(name="vq", description="image patches as k-means codes fitted on the input", inputs="image",
                config=VqConfig, open=VqCodec),
        Encoder(name="vae", description="image latents of a diffusers AutoencoderKL (momkit[diffusers])",
                inputs="image", config=VaeConfig, open=lambda config, directory, device: VaeCodec(config, device)),
        Encoder(name="vqmodel", description="image codes of a diffusers VQModel (momkit[diffusers])",
                inputs="image", config=VqModelConfig,
                open=lambda config, directory, device: VqModelCodec(config, device)),
        Encoder(name="logmel", description="audio as log-mel frames (continuous latents)", inputs="audio",
                config=LogMelConfig, open=lambda config, directory, device: LogMelCodec(config)),
        Encoder(name="units", description="audio as k-means units over log-mel frames, fitted on the input",
                inputs="audio", config=UnitsConfig, open=UnitsCodec),
    ]

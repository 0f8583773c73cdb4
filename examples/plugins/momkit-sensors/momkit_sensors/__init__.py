"""An example momkit plugin, installed as its own distribution: a modality, a dataset and a backbone.

- modality ``sensor``: continuous readings of a multi-channel sensor, ``latent_dim`` channels per position;
- dataset ``sine_waves``: documents made of a text caption ("wave 3 hz") followed by a recording of that
  sine wave, so that a model can learn to denoise or predict a recording from its caption;
- backbone ``ema``: a gated exponential moving average over time (:mod:`momkit_sensors.ema`), whose tests
  (``tests/``) run momkit's block contract checks;
- encoder ``waveform``: a recording (audio) as sensor readings, ``latent_dim`` consecutive samples per position,
  so that ``momkit convert`` turns a folder of WAV files with captions into ``sensor`` data.

momkit finds them all through the ``momkit`` entry point in this package's ``pyproject.toml``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from momkit import Batch, hookimpl
import numpy as np

from momkit.configs import EncoderConfig
from momkit.descriptors import Backbone, Dataset, Encoder, Modality
from momkit.errors import SpecError
from momkit.spec import DatasetConfig, ModalityConfig
from momkit_sensors import ema


class SensorConfig(ModalityConfig):
    """A sensor's readings: ``latent_dim`` channels per position."""

    latent_dim: int | None = Field(4, gt=0, description="Channels per reading.")


class SineWavesConfig(DatasetConfig):
    """Captioned sine-wave recordings."""

    recording_length: int = Field(24, ge=2, description="Readings per recording.")


class SineWaves:
    """Random-access batches; document ``i`` of a split depends only on ``(seed, split, i)``."""

    def __init__(self, config: SineWavesConfig, modalities: list[ModalityConfig], split: str, seq_len: int):
        kinds = [m.kind for m in modalities]
        for needed in ("text", "sensor"):
            if kinds.count(needed) != 1:
                raise SpecError(f"sine_waves needs exactly one modality of kind {needed!r}; the spec has "
                                f"{kinds.count(needed)} (modalities: {[m.name for m in modalities]})")
        self.text, self.sensor = kinds.index("text"), kinds.index("sensor")
        self.sensor_name, self.channels = modalities[self.sensor].name, modalities[self.sensor].latent_dim
        self.config, self.seq_len = config, seq_len
        self.stream = 0 if split == "train" else 1

    def num_batches(self, batch_size: int) -> None:
        return None

    def _document(self, index: int) -> tuple[list[int], list[int], torch.Tensor]:
        g = torch.Generator().manual_seed((self.config.seed * 2 + self.stream) * 1_000_003 + index)
        hertz = int(torch.randint(1, 10, (1,), generator=g))
        caption = list(f"wave {hertz} hz ".encode())
        n = self.config.recording_length
        phase = torch.rand(self.channels, generator=g) * 2 * math.pi
        t = torch.arange(n, dtype=torch.float32)[:, None] / n
        recording = torch.sin(2 * math.pi * hertz * t + phase)
        modality = [self.text] * len(caption) + [self.sensor] * n
        return modality, caption + [0] * n, torch.cat([torch.zeros(len(caption), self.channels), recording])

    def batch(self, index: int, batch_size: int) -> Batch:
        """Row ``r`` packs documents from ``(index * batch_size + r) * per_row`` on, cut at ``seq_len``."""
        per_row = self.seq_len // self.config.recording_length + 1
        rows = []
        for r in range(batch_size):
            document = (index * batch_size + r) * per_row
            modality, tokens, latents, seq_idx = [], [], [], []
            while len(modality) < self.seq_len:
                m, tok, lat = self._document(document)
                modality += m
                tokens += tok
                latents.append(lat)
                seq_idx += [document] * len(m)
                document += 1
            rows.append((modality[:self.seq_len], tokens[:self.seq_len], torch.cat(latents)[:self.seq_len],
                         seq_idx[:self.seq_len]))
        return Batch(modality=torch.tensor([r[0] for r in rows]), tokens=torch.tensor([r[1] for r in rows]),
                     latents={self.sensor_name: torch.stack([r[2] for r in rows])},
                     seq_idx=torch.tensor([r[3] for r in rows]))


class WaveformConfig(EncoderConfig):
    """Raw samples of a recording, `channels` consecutive ones per position (the last, partial frame dropped)."""

    discrete = False

    channels: int = Field(4, ge=1, description="Samples per position: the sensor modality's latent_dim.")

    def size(self) -> int:
        return self.channels


class Waveform:
    """The codec of ``waveform``: nothing to fit; decodes back to a recording."""

    fit_items = 0

    def __init__(self, config: WaveformConfig):
        self.size = config.channels

    def encode(self, clips) -> list[np.ndarray]:
        frames = []
        for samples, _rate in clips:
            count = len(samples) // self.size
            if not count:
                raise SpecError(f"a recording of {len(samples)} samples is shorter than one frame of {self.size}")
            frames.append(np.asarray(samples[:count * self.size], dtype=np.float32).reshape(count, self.size))
        return frames

    def decode(self, values) -> np.ndarray:
        return np.asarray(values).reshape(-1)


@hookimpl
def momkit_encoders():
    return [Encoder(name="waveform", description="a recording as sensor readings (example plugin)", inputs="audio",
                    config=WaveformConfig, open=lambda config, directory, device: Waveform(config))]


@hookimpl
def momkit_modalities():
    return [Modality(name="sensor", description="multi-channel sensor readings (continuous)", config=SensorConfig)]


@hookimpl
def momkit_datasets():
    return [Dataset(name="sine_waves", description="captioned sine-wave recordings", config=SineWavesConfig,
                    build=SineWaves)]


@hookimpl
def momkit_backbones():
    return [Backbone(name="ema", description="gated exponential moving average (example plugin)",
                     config=ema.EmaConfig, block=ema.EmaBlock, sublayers=ema.SUBLAYERS, flops=ema.flops)]

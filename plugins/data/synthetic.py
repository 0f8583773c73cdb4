"""The ``synthetic`` dataset: tiny random documents over every modality of the spec, for tests.

Document ``i`` of a split is drawn from ``(seed, split, i)`` alone: a length uniform in
``[min_length, max_length]``, filled with runs of uniform length in ``[1, segment_length]``, each of a modality
drawn uniformly from the spec's; tokens are uniform over the modality's vocabulary, latents standard normal.
Both splits are endless, and disjoint by their seed streams.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import Field, model_validator

from momkit.errors import SpecError
from momkit.plugins.data.packing import Chunk, PackedSource, Piece, StridedLayout, check_split, keyed_seed, segment
from momkit.spec import DatasetConfig, ModalityConfig


class SyntheticConfig(DatasetConfig):
    """Random documents of random modalities (for tests; nothing to learn)."""

    min_length: int = Field(8, ge=1, description="Fewest positions of a document.")
    max_length: int = Field(64, ge=1, description="Most positions of a document.")
    segment_length: int = Field(16, ge=1, description="Longest run of one modality within a document.")

    @model_validator(mode="after")
    def _lengths_ordered(self) -> SyntheticConfig:
        if self.min_length > self.max_length:
            raise SpecError(f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})")
        return self


class SyntheticStore:
    """The random documents of one split."""

    def __init__(self, config: SyntheticConfig, modalities: Sequence[ModalityConfig], split: str):
        self.config, self.modalities, self.split = config, list(modalities), split

    def _rng(self, doc: int) -> np.random.Generator:
        return np.random.default_rng(keyed_seed("synthetic", self.config.seed, self.split, doc))

    def length(self, docs: np.ndarray) -> np.ndarray:
        """``(n,)`` int64 lengths of documents ``docs (n,)``."""
        return np.array([self._rng(int(d)).integers(self.config.min_length, self.config.max_length + 1)
                         for d in docs], dtype=np.int64)

    def read(self, pieces: Sequence[Piece]) -> list[Chunk]:
        """One chunk per piece."""
        return [self._document(p.doc).cut(p.start, p.stop) for p in pieces]

    def _document(self, doc: int) -> Chunk:
        rng = self._rng(doc)
        remaining = int(rng.integers(self.config.min_length, self.config.max_length + 1))
        segments = []
        while remaining:
            i = int(rng.integers(len(self.modalities)))
            n = min(remaining, int(rng.integers(1, self.config.segment_length + 1)))
            m = self.modalities[i]
            segments.append(segment(i, rng.integers(m.vocab_size, size=n)) if m.discrete else
                            segment(i, latents=rng.standard_normal((n, m.latent_dim))))
            remaining -= n
        return Chunk.join(segments)


def build(config: SyntheticConfig, modalities: Sequence[ModalityConfig], split: str, seq_len: int) -> PackedSource:
    """The endless ``split`` of ``synthetic`` as batches of ``seq_len`` positions."""
    check_split(split, seq_len)
    store = SyntheticStore(config, modalities, split)
    return PackedSource(modalities, seq_len, store, StridedLayout(store.length, seq_len, config.min_length))

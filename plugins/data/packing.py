"""Packing documents into random-access batches: the part every dataset shares.

A dataset is a *store* of documents (``read(pieces)``) and a *layout* saying which pieces of which
documents make row ``g`` of a split. A row is ``seq_len`` positions of documents placed back
to back; ``seq_idx`` numbers the documents of a row ``0, 1, ...`` from its first position, and a document
cut at the row's end continues nowhere in that row.

Two layouts:

- :class:`StreamLayout` (finite splits): the split's documents are one stream of positions and row ``g`` is
  positions ``[g * seq_len, (g + 1) * seq_len)`` of it, so every position is used once per epoch and a row may
  open with the rest of a document that the previous row cut. It needs the lengths of all documents.
- :class:`StridedLayout` (endless splits): row ``g`` packs documents ``g * k, g * k + 1, ...`` from a document
  start, where ``k = ceil(seq_len / min_length)`` is enough documents for any row; the documents a row does not
  reach are never used. Row ``g`` needs only the lengths of its own ``k`` documents, so any row is cheap to
  reach, however far into the split.
"""

from __future__ import annotations

import hashlib
import math
from numbers import Integral
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from momkit import Batch
from momkit.errors import SpecError
from momkit.spec import ModalityConfig

SPLITS = ("train", "eval")


def check_split(split: str, seq_len: int) -> None:
    """Raise ``ValueError`` for an unknown ``split`` or a ``seq_len`` below 1."""
    if split not in SPLITS:
        raise SpecError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise SpecError(f"seq_len must be a positive int, got {seq_len!r}")


def keyed_seed(*key) -> int:
    """A 128-bit seed determined by ``key`` (ints and strings) alone, in any process and on any platform."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=16).digest(), "little")


@dataclass
class Chunk:
    """Consecutive positions of one document.

    Attributes:
        modality: ``(n,)`` int64 modality ids (indices into the spec's modalities).
        tokens: ``(n,)`` int64 token ids, 0 at positions of continuous modalities.
        latents: ``{modality id: (n_m, latent_dim)}`` float32 vectors of the positions of each continuous
            modality, in position order.
    """

    modality: np.ndarray
    tokens: np.ndarray
    latents: dict[int, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.modality)

    def cut(self, start: int, stop: int) -> Chunk:
        """Positions ``[start, stop)`` of this chunk."""
        latents = {}
        for m, rows in self.latents.items():
            where = self.modality == m
            first = int(where[:start].sum())
            latents[m] = rows[first:first + int(where[start:stop].sum())]
        return Chunk(self.modality[start:stop], self.tokens[start:stop], latents)

    @classmethod
    def join(cls, chunks: Sequence[Chunk]) -> Chunk:
        """The chunks one after another (the segments of one document)."""
        latents: dict[int, list[np.ndarray]] = {}
        for chunk in chunks:
            for m, rows in chunk.latents.items():
                latents.setdefault(m, []).append(rows)
        return cls(np.concatenate([c.modality for c in chunks]), np.concatenate([c.tokens for c in chunks]),
                   {m: np.concatenate(rows) for m, rows in latents.items()})


def segment(modality_id: int, tokens: np.ndarray | None = None, latents: np.ndarray | None = None) -> Chunk:
    """A chunk of one modality: discrete ``tokens (n,)`` or continuous ``latents (n, latent_dim)``."""
    if latents is None:
        return Chunk(np.full(len(tokens), modality_id, dtype=np.int64), np.asarray(tokens, dtype=np.int64))
    n = len(latents)
    return Chunk(np.full(n, modality_id, dtype=np.int64), np.zeros(n, dtype=np.int64),
                 {modality_id: np.asarray(latents, dtype=np.float32)})


class Piece(NamedTuple):
    """Positions ``[start, stop)`` of document ``doc``."""

    doc: int
    start: int
    stop: int


class Store(Protocol):
    """The documents of a split, addressed by index."""

    def read(self, pieces: Sequence[Piece]) -> list[Chunk]:
        """One chunk per piece."""


class StreamLayout:
    """Row ``g`` is positions ``[g * seq_len, (g + 1) * seq_len)`` of the documents laid end to end.

    Args:
        offsets: ``(n + 1,)`` int64 start position of each of the split's ``n`` documents and the end of the
            last, in any frame (only differences count; a memory-mapped array is read, not copied). The
            documents are ``first_doc .. first_doc + n - 1`` of the store.
        seq_len: Positions per row.
        first_doc: Store index of the split's first document.
        name: The split, as error messages name it (e.g. ``"the eval split of data.jsonl"``).

    Raises:
        SpecError: the documents hold fewer than ``seq_len`` positions.
    """

    def __init__(self, offsets: np.ndarray, seq_len: int, first_doc: int = 0, name: str = "the split"):
        self.offsets, self.seq_len, self.first_doc = offsets, seq_len, first_doc
        self.base = int(offsets[0])
        positions = int(offsets[-1]) - self.base
        self.rows = positions // seq_len
        if self.rows == 0:
            raise SpecError(f"{name} has {len(offsets) - 1} documents of {positions} positions in all, fewer "
                            f"than one row of seq_len {seq_len}; add documents or lower seq_len")

    def pieces(self, row: int) -> list[Piece]:
        begin = self.base + row * self.seq_len
        end = begin + self.seq_len
        first = int(np.searchsorted(self.offsets, begin, side="right")) - 1
        last = int(np.searchsorted(self.offsets, end, side="left"))
        starts = [int(o) for o in self.offsets[first:last + 1]]
        return [Piece(self.first_doc + first + j, max(begin, start) - start, min(end, stop) - start)
                for j, (start, stop) in enumerate(zip(starts, starts[1:]))]


class StridedLayout:
    """Row ``g`` packs documents ``g * k, g * k + 1, ...`` from their starts until ``seq_len`` positions.

    Args:
        length: ``length(docs)``: the ``(n,)`` int64 lengths of documents ``docs (n,)``.
        seq_len: Positions per row.
        min_length: The shortest a document can be, so that ``k = ceil(seq_len / min_length)`` documents
            always fill a row.
    """

    rows = None

    def __init__(self, length: Callable[[np.ndarray], np.ndarray], seq_len: int, min_length: int):
        self.length, self.seq_len = length, seq_len
        self.stride = math.ceil(seq_len / min_length)

    def pieces(self, row: int) -> list[Piece]:
        docs = np.arange(row * self.stride, (row + 1) * self.stride)
        ends = np.cumsum(self.length(docs))
        used = int(np.searchsorted(ends, self.seq_len, side="left")) + 1
        starts = np.concatenate([[0], ends[:used - 1]])
        return [Piece(int(d), 0, int(min(n, self.seq_len - s)))
                for d, s, n in zip(docs[:used], starts, ends[:used] - starts)]


class PackedSource:
    """The ``source`` of the :class:`momkit.descriptors.Dataset` contract: random-access batches of a split.

    ``batch(index, batch_size)`` holds rows ``index * batch_size .. index * batch_size + batch_size - 1`` of
    the layout. A finite split of ``R`` rows has ``ceil(R / batch_size)`` batches; its last batch is filled up
    with rows from the split's start, and ``batch(i)`` equals ``batch(i % num_batches)`` (epochs repeat).

    Args:
        modalities: The spec's modalities; every continuous one gets a ``(b, l, latent_dim)`` entry in
            ``Batch.latents`` in every batch (zeros where it does not occur), so objectives find it.
        seq_len: Positions per row.
        store: The split's documents.
        layout: A :class:`StreamLayout` or :class:`StridedLayout` over ``store``.
        token_bytes: ``{name: (vocab_size,) int64}`` UTF-8 bytes of each token of the text modalities whose
            encoder is known, for the evaluation's bits per byte.
    """

    def __init__(self, modalities: Sequence[ModalityConfig], seq_len: int, store: Store,
                 layout: StreamLayout | StridedLayout, token_bytes: dict[str, np.ndarray] | None = None):
        self.modalities, self.seq_len, self.store, self.layout = list(modalities), seq_len, store, layout
        self.token_bytes = token_bytes or {}

    def num_batches(self, batch_size: int) -> int | None:
        """``None`` for an endless split, else the number of distinct batches of ``batch_size`` rows."""
        batch_size = _check_batch_size(batch_size)
        return None if self.layout.rows is None else -(-self.layout.rows // batch_size)

    def batch(self, index: int, batch_size: int) -> Batch:
        """Batch number ``index``: ``batch_size`` rows of ``seq_len`` positions, the same for the same index."""
        batch_size = _check_batch_size(batch_size)
        if not isinstance(index, Integral) or index < 0:
            raise SpecError(f"batch index must be a non-negative int, got {index!r}")
        index = int(index)
        rows = range(index * batch_size, (index + 1) * batch_size)
        if self.layout.rows is not None:
            index %= self.num_batches(batch_size)
            rows = [(index * batch_size + r) % self.layout.rows for r in range(batch_size)]
        pieces = [self.layout.pieces(row) for row in rows]
        chunks = iter(self.store.read([p for row in pieces for p in row]))
        shape = (batch_size, self.seq_len)
        modality, tokens, seq_idx = (np.zeros(shape, dtype=np.int64) for _ in range(3))
        latents = {i: np.zeros((*shape, m.latent_dim), dtype=np.float32)
                   for i, m in enumerate(self.modalities) if not m.discrete}
        for r, row in enumerate(pieces):
            position = 0
            for j in range(len(row)):
                chunk = next(chunks)
                span = slice(position, position + len(chunk))
                modality[r, span], tokens[r, span], seq_idx[r, span] = chunk.modality, chunk.tokens, j
                for m, vectors in chunk.latents.items():
                    latents[m][r, span][chunk.modality == m] = vectors
                position += len(chunk)
        return Batch(modality=torch.from_numpy(modality), tokens=torch.from_numpy(tokens),
                     latents={self.modalities[m].name: torch.from_numpy(v) for m, v in latents.items()},
                     seq_idx=torch.from_numpy(seq_idx))


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, Integral) or batch_size < 1:
        raise SpecError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)

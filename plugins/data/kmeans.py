"""Exact k-means codebooks: the same codebook, and the same codes, on any machine.

Points are integer-valued (pixel values 0..255, speech features rounded to integers) and centroids are kept on
a grid of 1/256, so every product and sum of a squared distance ``|c|^2 - 2 x.c`` is exact in float64 whatever
the order of the additions (a BLAS's blocking, the number of threads, the size of the batch). Assignments, with
ties broken towards the lower code, are therefore bitwise reproducible, and so is every fitted codebook.
"""

from __future__ import annotations

import numpy as np
import torch

GRID = 256.0
UNUSED = 1e6
"""Coordinate of the codes left over when there are fewer distinct points than codes: never the nearest."""


def _snap(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * GRID) / GRID


def nearest(points: torch.Tensor, codebook: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """``(n,)`` int64 index of the nearest code of ``codebook (k, d)`` to each of ``points (n, d)`` (float64)."""
    squares = codebook.square().sum(1)
    return torch.cat([(squares - 2 * part @ codebook.T).argmin(1) for part in points.split(block)])


def fit(points: torch.Tensor, size: int, iterations: int, seed: int) -> torch.Tensor:
    """A ``(size, d)`` float64 codebook of ``points (n, d)`` by Lloyd's k-means.

    Starts from ``size`` distinct points drawn with ``seed`` and stops after ``iterations`` updates or when
    nothing moves. A code that loses all its points stays where it is.
    """
    points = points.double()
    distinct = torch.unique(points, dim=0)
    chosen = np.random.default_rng(seed).permutation(len(distinct))[:size]
    codebook = distinct[torch.from_numpy(chosen)]
    for _ in range(iterations):
        codes = nearest(points, codebook)
        counts = torch.bincount(codes, minlength=len(codebook))
        sums = torch.zeros_like(codebook).index_add_(0, codes, points)
        used = counts > 0
        updated = codebook.clone()
        updated[used] = _snap(sums[used] / counts[used, None])
        if torch.equal(updated, codebook):
            break
        codebook = updated
    spare = torch.full((size - len(codebook), points.shape[1]), UNUSED, dtype=torch.float64)
    return torch.cat([codebook, spare])

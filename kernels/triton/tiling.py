"""What the Triton kernels share: the check of their ``Tiling`` dataclasses, block sizes rounded up to powers of
two, launch grids' counts of blocks, and the refusal of float64 inputs."""

from __future__ import annotations

from dataclasses import fields

import torch

from momkit.errors import SpecError


def refuse_float64(what: str, **tensors) -> None:
    """Refuse float64 tensors among ``tensors`` (``None`` for an absent one): the kernels of ``what`` compute in
    float32."""
    wide = [name for name, t in tensors.items() if t is not None and t.dtype == torch.float64]
    if wide:
        raise SpecError(f"the triton {what} computes in float32 but {', '.join(wide)} is torch.float64; pass "
                        f"float32, bfloat16 or float16 tensors, or use backend='reference'")


def check_tiling(tiling, counts: tuple[str, ...], small: tuple[str, ...] = (), sizes: tuple[str, ...] = ()) -> None:
    """Refuse a field of the dataclass ``tiling`` that its kernels cannot take.

    A field named in ``sizes`` must be at least 0, one whose name ends in one of ``counts`` at least 1; every
    other is a block size or a warp count, a power of two, and at least 16 (``tl.dot``'s smallest size) unless its
    name ends in ``warps`` or is in ``small``; a ``bool`` field is a switch, and any value of it is valid.
    """
    for f in fields(tiling):
        name, value = f.name, getattr(tiling, f.name)
        if isinstance(value, bool):
            continue
        if name in sizes:
            if value < 0:
                raise SpecError(f"Tiling.{name} must be at least 0, got {value}")
        elif name.endswith(counts):
            if value < 1:
                raise SpecError(f"Tiling.{name} must be at least 1, got {value}")
        elif value < 1 or value & (value - 1):
            raise SpecError(f"Tiling.{name} must be a power of two, got {value}")
        elif not (name.endswith("warps") or name in small) and value < 16:
            raise SpecError(f"Tiling.{name} must be at least 16 (tl.dot's smallest size), got {value}")


def pow2(x: int) -> int:
    """The smallest power of two that is at least ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, (x - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ``b > 0``: the host's count of blocks of ``b`` in ``a`` (``triton.cdiv`` is a constexpr
    function, whose call from Python costs a decoding step's launch several microseconds)."""
    return -(-a // b)

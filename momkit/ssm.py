"""What the state-space backbones share: the options of the Mamba-style mixer (inner width, causal conv,
projection biases, initial step sizes), the step sizes' initialisation, and float32 promotion.

A backbone whose block widens the stream to ``d_inner = expand * d_model``, runs a depthwise causal conv and
has a data-dependent step size ``dt = softplus(... + dt_bias)`` (Mamba, Mamba-2, and third-party variants)
subclasses :class:`SSMConfig` for its options and draws its biases with :func:`initial_dt_bias`, as
mamba_ssm's modules do.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn

from momkit.configs import BackboneConfig
from momkit.errors import SpecError


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in its own dtype if that is wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def decay_and_skip(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A Mamba block's ``A = -exp(A_log)`` and ``D`` in float32 at least, for decoding.

    Without gradients they are kept on the block while ``A_log`` and ``D`` keep their storage and version
    counters (any in-place change, an optimizer step or ``load_state_dict``, moves the counter), so that a
    decoding step does not recompute them: four kernels a layer, a large part of a CUDA-graphed step's time.
    """
    if torch.is_grad_enabled():
        return -torch.exp(at_least_fp32(block.A_log)), at_least_fp32(block.D)
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in (block.A_log, block.D))
    kept = block.__dict__.get("_decay_and_skip")
    if kept is None or kept[0] != key:
        kept = block.__dict__["_decay_and_skip"] = (key, -torch.exp(at_least_fp32(block.A_log)),
                                                    at_least_fp32(block.D))
    return kept[1], kept[2]


class SSMConfig(BackboneConfig):
    """Backbone options of the Mamba-style mixer (defaults as in mamba_ssm's ``Mamba`` and ``Mamba2``)."""

    expand: int = Field(2, gt=0, description="d_inner = expand * d_model.")
    d_conv: int = Field(4, gt=0, description="Kernel width of the depthwise causal conv.")
    conv_bias: bool = Field(True, description="Whether conv1d has a bias.")
    bias: bool = Field(False, description="Whether in_proj and out_proj have biases.")
    dt_min: float = Field(0.001, gt=0, description="Smallest initial step size.")
    dt_max: float = Field(0.1, gt=0, description="Largest initial step size.")
    dt_init_floor: float = Field(1e-4, gt=0, description="Floor of the initial step sizes.")

    @model_validator(mode="after")
    def _dt_range(self) -> SSMConfig:
        if self.dt_min > self.dt_max:
            raise SpecError(f"dt_min ({self.dt_min}) must not exceed dt_max ({self.dt_max})")
        return self

    @property
    def d_inner(self) -> int:
        """Width of the mixer: ``expand * d_model``."""
        return self.expand * self.d_model


def initial_dt_bias(config: SSMConfig, shape: tuple[int, ...]) -> torch.Tensor:
    """mamba_ssm's step-size initialisation: biases of ``shape`` whose softplus is log-uniform in
    ``[config.dt_min, config.dt_max]``, floored at ``config.dt_init_floor``."""
    dt = torch.exp(torch.rand(shape) * (math.log(config.dt_max) - math.log(config.dt_min))
                   + math.log(config.dt_min)).clamp(min=config.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))

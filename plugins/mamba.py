"""The Mamba-1 backbone (Gu & Dao 2023) with modality routing: Mixture-of-Mamba (Liang et al. 2025).

One block is a pre-norm residual layer, ``y = x + mixer(norm(x))``, whose mixer reads as the paper's
diagram::

    x ─ norm ─ in_proj ─┬─ x_in ─ conv1d ─ silu ─ u ─┬─────────────────────────── selective_scan ─ * silu(z) ─ out_proj ─ + x
                        │                            └─ x_proj ─┬─ dt_low ─ dt_proj ─ dt ─┤
                        │                                       └─ B, C ──────────────────┘
                        └─ z ──────────────────────────────────────────────────────────────────────┘

Every sublayer can be routed. The ``mom`` preset routes ``in_proj``, ``x_proj``, ``dt_proj`` and
``out_proj``, the four projections of the Mixture-of-Mamba paper, and keeps ``norm``, ``conv1d``, ``A_log``
and ``D`` shared. A routed ``A_log`` uses the scan front door's per-modality ``A``; a routed ``D`` is applied
outside the scan.

With bidirectional modalities (the spec's ``bidirectional``) the block adds Vision Mamba's backward direction
(Zhu et al. 2024): its own ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_log_b`` and ``D_b`` run over every
span reversed in place, from the shared ``in_proj``'s ``x_in`` and ``z``, and the backward output is added to
the forward one inside the spans before ``out_proj``. ``mom`` routes ``x_proj_b`` and ``dt_proj_b`` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from momkit import hookimpl, ops
from momkit.blocks import Block, Layout, reverse_spans
from momkit.descriptors import Backbone
from momkit.errors import SpecError
from momkit.routing import CausalConv1d, Linear, RMSNorm, no_weight_decay
from momkit.ssm import SSMConfig, at_least_fp32, initial_dt_bias

BACKWARD = ("conv1d_b", "x_proj_b", "dt_proj_b", "A_log_b", "D_b")
SUBLAYERS = ("norm", "in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj", *BACKWARD)
MOM = ("in_proj", "x_proj", "dt_proj", "out_proj", "x_proj_b", "dt_proj_b")


class MambaConfig(SSMConfig):
    """Options of the ``mamba`` backbone (defaults as in mamba_ssm's ``Mamba`` module)."""

    d_state: int = Field(16, gt=0, description="State size n per channel.")
    dt_rank: int | Literal["auto"] = Field("auto", description="Rank of the dt projection; `auto` is "
                                                               "ceil(d_model / 16).")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the RMSNorm.")

    @model_validator(mode="after")
    def _rank(self) -> MambaConfig:
        if isinstance(self.dt_rank, int) and self.dt_rank < 1:
            raise SpecError(f"dt_rank must be a positive int or 'auto', got {self.dt_rank}")
        return self

    @property
    def rank(self) -> int:
        """The dt projection's rank, ``dt_rank`` resolved."""
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank


@dataclass
class MambaState:
    """Decoding state of one block: the last ``d_conv`` conv inputs and the SSM state."""

    conv: torch.Tensor  # (b, d_inner, d_conv), oldest first
    ssm: torch.Tensor  # (b, d_inner, d_state)


class MambaBlock(Block):
    """One Mamba-1 layer whose sublayers are shared or routed as the spec says."""

    config: MambaConfig
    supports_bidirectional = True

    def __init__(self, config: MambaConfig, modalities: list[str], routed: frozenset[str], backend: str = "auto", *,
                 bidirectional: tuple[str, ...] = ()):
        super().__init__(config, modalities, routed, backend, bidirectional=bidirectional)
        d, di = config.d_model, config.d_inner
        self.norm = RMSNorm(d, eps=config.norm_eps, n_modalities=self.routing("norm"))
        self.in_proj = Linear(d, 2 * di, bias=config.bias, n_modalities=self.routing("in_proj"), backend=backend)
        directions = ("", "_b") if self.bidirectional else ("",)
        for suffix in directions:
            self._direction(suffix)
        self.out_proj = Linear(di, d, bias=config.bias, n_modalities=self.routing("out_proj"), backend=backend)
        for suffix in directions:
            self._init_dt(getattr(self, "dt_proj" + suffix))

    def _direction(self, suffix: str) -> None:
        """The sublayers of one scan direction (``suffix`` ``""`` forward, ``"_b"`` backward): ``conv1d``,
        ``x_proj``, ``dt_proj``, ``A_log`` and ``D``."""
        cfg, backend = self.config, self.backend
        di, n, r = cfg.d_inner, cfg.d_state, cfg.rank

        def sets(name: str) -> int | None:
            return self.routing(name + suffix)

        def copies(name: str) -> tuple[int, ...]:
            return () if sets(name) is None else (self.n_modalities,)

        setattr(self, "conv1d" + suffix, CausalConv1d(di, cfg.d_conv, bias=cfg.conv_bias,
                                                      n_modalities=sets("conv1d"), backend=backend))
        setattr(self, "x_proj" + suffix, Linear(di, r + 2 * n, bias=False, n_modalities=sets("x_proj"),
                                                backend=backend))
        setattr(self, "dt_proj" + suffix, Linear(r, di, bias=True, n_modalities=sets("dt_proj"), backend=backend))
        setattr(self, "A_log" + suffix, no_weight_decay(nn.Parameter(
            torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(*copies("A_log"), di, 1))))
        setattr(self, "D" + suffix, no_weight_decay(nn.Parameter(torch.ones(*copies("D"), di))))

    @torch.no_grad()
    def _init_dt(self, dt_proj: Linear) -> None:
        """Mamba's step-size initialisation: ``softplus(dt_proj.bias)`` log-uniform in [dt_min, dt_max]."""
        bound = self.config.rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -bound, bound)
        dt_proj.bias.copy_(initial_dt_bias(self.config, tuple(dt_proj.bias.shape)))

    def _split(self, x_dbl: torch.Tensor):
        return x_dbl.split([self.config.rank, self.config.d_state, self.config.d_state], dim=-1)

    def _scan(self, x_in: torch.Tensor, z: torch.Tensor, modality: torch.Tensor, seq_idx: torch.Tensor | None,
              suffix: str = "") -> torch.Tensor:
        """The scan of one direction over ``x_in, z (b, l, d_inner)``, gated: ``(b, l, d_inner)``."""
        conv1d, x_proj, dt_proj = (getattr(self, name + suffix) for name in ("conv1d", "x_proj", "dt_proj"))
        A_log, D = getattr(self, "A_log" + suffix), getattr(self, "D" + suffix)
        u = F.silu(conv1d(x_in, modality, seq_idx))
        dt_low, B, C = self._split(x_proj(u, modality))
        dt = dt_proj(dt_low, modality)
        routed_D = self.routing("D" + suffix) is not None
        y = ops.selective_scan(u.mT, dt.mT, -torch.exp(at_least_fp32(A_log)), B.mT, C.mT,
                               D=None if routed_D else at_least_fp32(D), z=None if routed_D else z.mT,
                               delta_softplus=True, modality=None if self.routing("A_log" + suffix) is None else
                               modality, seq_idx=seq_idx, backend=self.backend).mT
        if routed_D:
            y = (y + u * D[modality]) * F.silu(z)
        return y

    def run(self, x: torch.Tensor, layout: Layout, state: MambaState | None = None) -> torch.Tensor:
        """``x (b, l, d_model)`` -> ``(b, l, d_model)``; see :meth:`momkit.Block.run`."""
        modality, seq_idx = layout.modality, layout.seq_idx
        x_in, z = self.in_proj(self.norm(x, modality), modality).chunk(2, dim=-1)
        y = self._scan(x_in, z, modality, seq_idx)
        spans = self.spans(layout)
        if spans is not None:
            backward = self._scan(reverse_spans(x_in, spans), reverse_spans(z, spans), modality, spans.segments, "_b")
            y = torch.where(spans.mask[..., None], y + reverse_spans(backward, spans), y)
        return x + self.out_proj(y, modality)

    def allocate_state(self, batch_size: int, max_length: int | None = None) -> MambaState:
        """Zero decoding state for ``batch_size`` sequences (``max_length`` is accepted and unused: the state
        of a Mamba block does not grow with the sequence)."""
        weight = self.in_proj.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        di = self.config.d_inner
        return MambaState(conv=torch.zeros(batch_size, di, self.config.d_conv, dtype=weight.dtype,
                                           device=weight.device),
                          ssm=torch.zeros(batch_size, di, self.config.d_state, dtype=dtype, device=weight.device))

    def run_step(self, x: torch.Tensor, layout: Layout, state: MambaState) -> torch.Tensor:
        """Decode one position: ``x (b, d_model)``, ``layout.modality (b,)``; updates ``state`` in place."""
        modality = layout.modality
        x_in, z = self.in_proj(self.norm(x, modality), modality).chunk(2, dim=-1)
        u = self.conv1d.step(x_in, state.conv, modality, activation="silu")
        dt_low, B, C = self._split(self.x_proj(u, modality))
        routed = self.routing("A_log") is not None or self.routing("D") is not None
        y = ops.selective_state_update(state.ssm, u, self.dt_proj(dt_low, modality), -torch.exp(
            at_least_fp32(self.A_log)), B, C, D=at_least_fp32(self.D), z=z, dt_softplus=True,
            modality=modality if routed else None, backend=self.backend)
        return x + self.out_proj(y, modality)


def flops(config: MambaConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block (independent of ``seq_len``).

    The scan counts, per channel and state, the decay (a multiply and an exponential), the input
    ``dt B u`` (two multiplies), the update (a multiply-add) and the read-out ``C h`` (a multiply-add): 8;
    the skip, the gate and the softplus of ``dt`` add a few per channel.
    """
    d, di, n, r = config.d_model, config.d_inner, config.d_state, config.rank
    return {
        "norm": 4.0 * d,
        "in_proj": 2.0 * d * 2 * di,
        "conv1d": 2.0 * di * config.d_conv,
        "x_proj": 2.0 * di * (r + 2 * n),
        "dt_proj": 2.0 * r * di,
        "scan": 8.0 * di * n + 8.0 * di,
        "out_proj": 2.0 * di * d,
    }


@hookimpl
def momkit_backbones():
    return [Backbone(name="mamba", description="Mamba-1 selective SSM block; preset mom = Mixture-of-Mamba",
                     config=MambaConfig, block=MambaBlock, sublayers=SUBLAYERS, presets={"mom": MOM},
                     flops=flops, backward_sublayers=BACKWARD,
                     backward_flops=("conv1d", "x_proj", "dt_proj", "scan"))]

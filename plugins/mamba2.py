"""The Mamba-2 backbone (Dao & Gu 2024, "Transformers are SSMs") with modality routing.

One block is a pre-norm residual layer, ``y = x + mixer(norm(x))``, whose mixer is the state-space-duality
(SSD) block of mamba_ssm's ``Mamba2`` module::

    x ─ norm ─ in_proj ─┬─ xBC ─ conv1d ─ silu ─┬─ x ────┬─ ssd_scan(A, D) ─ y ─ gate_norm ─ out_proj ─ + x
                        │                       └─ B, C ─┤                           │
                        ├─ dt ─ + dt_bias ───────────────┘                           │
                        └─ z ────────────────────────────────────────────────────────┘

One projection, ``in_proj``, produces the gate ``z (b, l, d_inner)``, the scan input ``x (b, l, d_inner)``,
``B`` and ``C`` ``(b, l, ngroups * d_state)`` and the step sizes ``dt (b, l, nheads)``; the depthwise causal
conv and SiLU run over ``xBC``, the channels of ``x``, ``B`` and ``C`` together. The scan has one scalar decay
``A = -exp(A_log)`` per head of ``headdim`` channels and a skip ``D`` per head; ``gate_norm`` is the gated
RMSNorm ``rmsnorm(y * silu(z)) * w``, normalised per group of ``d_inner / ngroups`` channels.

Every sublayer can be routed. The ``mom`` preset routes ``in_proj`` and ``out_proj``: the Mixture-of-Mamba
choice carried over from Mamba-1, where the paper routes the input and output projections and the projections
that make the scan's data-dependent parameters (``x_proj`` for ``B``, ``C`` and the low-rank step, ``dt_proj``
for ``dt``), and keeps the convolution, ``A`` and ``D`` shared. Mamba-2 computes ``B``, ``C`` and ``dt`` in
``in_proj`` itself, so routing ``in_proj`` and ``out_proj`` routes every projection the paper routes, while
``conv1d``, ``A_log`` and ``D`` stay shared, and the norms too, as in Mamba-1's ``mom``. ``dt_bias`` (one per
head) also stays shared: it is the part of Mamba-1's routed ``dt_proj`` that does not read the input; the list
``[in_proj, out_proj, dt_bias]`` routes it as well.

A routed ``A_log`` uses the scan front door's per-modality ``A``; a routed ``dt_bias`` is added to ``dt``
before the scan and a routed ``D`` applied after it.

With bidirectional modalities (the spec's ``bidirectional``) the block adds a backward direction, as Vision
Mamba does for Mamba-1: its own ``conv1d_b``, ``dt_bias_b``, ``A_log_b`` and ``D_b`` run over every span
reversed in place, from the shared ``in_proj``'s ``xBC`` and ``dt`` (Mamba-2 makes ``B``, ``C`` and ``dt`` in
``in_proj``, so the backward direction's own conv is what gives it its own ``B`` and ``C``), and its output is
added to the forward one inside the spans before ``gate_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from momkit import hookimpl, ops
from momkit.blocks import Block, Layout, reverse_spans
from momkit.configs import divisors
from momkit.descriptors import Backbone
from momkit.errors import SpecError
from momkit.routing import CausalConv1d, GatedRMSNorm, Linear, RMSNorm, no_weight_decay
from momkit.ssm import SSMConfig, at_least_fp32, decay_and_skip, initial_dt_bias

BACKWARD = ("conv1d_b", "dt_bias_b", "A_log_b", "D_b")
SUBLAYERS = ("norm", "in_proj", "conv1d", "dt_bias", "A_log", "D", "gate_norm", "out_proj", *BACKWARD)
MOM = ("in_proj", "out_proj")


class Mamba2Config(SSMConfig):
    """Options of the ``mamba2`` backbone (defaults as in mamba_ssm's ``Mamba2`` module)."""

    d_state: int = Field(128, gt=0, description="State size n per head (per group of B and C).")
    headdim: int = Field(64, gt=0, description="Channels per head p; nheads = d_inner / headdim.")
    ngroups: int = Field(1, gt=0, description="Groups of B and C, each shared by nheads / ngroups heads; also "
                                              "the groups of the gated RMSNorm.")
    chunk_size: int = Field(256, gt=0, description="Chunk length of the SSD scan; the result does not depend "
                                                   "on it, its cost does.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the RMSNorm and of the gated RMSNorm.")

    @property
    def nheads(self) -> int:
        """Number of heads: ``d_inner / headdim``."""
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv, ``x``, ``B`` and ``C`` together: ``d_inner + 2 * ngroups * d_state``."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @model_validator(mode="after")
    def _shapes(self) -> Mamba2Config:
        if self.d_inner % self.headdim:
            raise SpecError(f"headdim ({self.headdim}) must divide d_inner = expand * d_model = {self.d_inner}; "
                            f"valid headdims: {', '.join(map(str, divisors(self.d_inner)))}")
        if self.nheads % self.ngroups:
            raise SpecError(f"ngroups ({self.ngroups}) must divide nheads = d_inner / headdim = {self.nheads}; "
                            f"valid ngroups: {', '.join(map(str, divisors(self.nheads)))}")
        return self


@dataclass
class Mamba2State:
    """Decoding state of one block: the last ``d_conv`` conv inputs and the SSM state."""

    conv: torch.Tensor  # (b, conv_dim, d_conv), oldest first
    ssm: torch.Tensor  # (b, nheads, headdim, d_state)


class Mamba2Block(Block):
    """One Mamba-2 layer whose sublayers are shared or routed as the spec says."""

    config: Mamba2Config
    supports_bidirectional = True
    supports_prefill = True
    capturable_step = True
    residual = True

    def __init__(self, config: Mamba2Config, modalities: list[str], routed: frozenset[str], backend: str = "auto",
                 *, bidirectional: tuple[str, ...] = ()):
        super().__init__(config, modalities, routed, backend, bidirectional=bidirectional)
        d, di, h, gn = config.d_model, config.d_inner, config.nheads, config.ngroups * config.d_state
        self.norm = RMSNorm(d, eps=config.norm_eps, n_modalities=self.routing("norm"))
        self.in_proj = Linear(d, 2 * di + 2 * gn + h, bias=config.bias, n_modalities=self.routing("in_proj"),
                              backend=backend)
        for suffix in ("", "_b") if self.bidirectional else ("",):
            setattr(self, "conv1d" + suffix, CausalConv1d(config.conv_dim, config.d_conv, bias=config.conv_bias,
                                                          n_modalities=self.routing("conv1d" + suffix),
                                                          backend=backend))
            setattr(self, "dt_bias" + suffix, no_weight_decay(nn.Parameter(
                initial_dt_bias(config, self._copies("dt_bias" + suffix) + (h,)))))
            setattr(self, "A_log" + suffix, no_weight_decay(nn.Parameter(
                torch.empty(self._copies("A_log" + suffix) + (h,)).uniform_(1, 16).log())))
            setattr(self, "D" + suffix, no_weight_decay(nn.Parameter(torch.ones(self._copies("D" + suffix) + (h,)))))
        self.gate_norm = GatedRMSNorm(di, di // config.ngroups, eps=config.norm_eps,
                                      n_modalities=self.routing("gate_norm"))
        self.out_proj = Linear(di, d, bias=config.bias, n_modalities=self.routing("out_proj"), backend=backend)

    def _copies(self, sublayer: str) -> tuple[int, ...]:
        """The leading shape of a parameter of ``sublayer``: ``(M,)`` routed, ``()`` shared."""
        return () if self.routing(sublayer) is None else (self.n_modalities,)

    def _split_in_proj(self, zxbcdt: torch.Tensor):
        """``(..., 2 di + 2 g n + h)`` -> ``z (..., di)``, ``xBC (..., conv_dim)``, ``dt (..., h)``."""
        cfg = self.config
        return zxbcdt.split([cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)

    def _split_xBC(self, xBC: torch.Tensor):
        """``(..., conv_dim)`` -> ``x (..., h, p)``, ``B (..., g, n)``, ``C (..., g, n)``."""
        cfg = self.config
        xs, B, C = xBC.split([cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        return (xs.unflatten(-1, (cfg.nheads, cfg.headdim)), B.unflatten(-1, (cfg.ngroups, cfg.d_state)),
                C.unflatten(-1, (cfg.ngroups, cfg.d_state)))

    def _scan(self, xBC: torch.Tensor, dt: torch.Tensor, modality: torch.Tensor, seq_idx: torch.Tensor | None,
              suffix: str = "", state: Mamba2State | None = None) -> torch.Tensor:
        """The conv and scan of one direction (``suffix`` ``""`` forward, ``"_b"`` backward) over ``xBC
        (b, l, conv_dim)`` and ``dt (b, l, nheads)``: ``y (b, l, nheads, headdim)``; from ``state`` (prefill),
        which it leaves at the last position."""
        dt_bias, A_log, D = (getattr(self, name + suffix) for name in ("dt_bias", "A_log", "D"))
        conv1d = getattr(self, "conv1d" + suffix)
        xs, B, C = self._split_xBC(F.silu(conv1d(xBC, modality, seq_idx) if state is None else
                                          conv1d.prefill(xBC, state.conv, modality)))
        routed_dt_bias, routed_D = self.routing("dt_bias" + suffix) is not None, self.routing("D" + suffix) is not None
        if routed_dt_bias:
            dt = dt + dt_bias[modality]
        y = ops.ssd_scan(xs, dt, -torch.exp(at_least_fp32(A_log)), B, C, self.config.chunk_size,
                         D=None if routed_D else at_least_fp32(D), z=None,
                         dt_bias=None if routed_dt_bias else dt_bias,
                         initial_states=None if state is None else state.ssm, seq_idx=seq_idx, dt_softplus=True,
                         return_final_states=state is not None,
                         modality=None if self.routing("A_log" + suffix) is None else modality, backend=self.backend)
        if state is not None:
            y, final = y
            state.ssm.copy_(final)
        if routed_D:
            y = y + xs * D[modality][..., None]
        return y

    def run(self, x: torch.Tensor, layout: Layout, state: Mamba2State | None = None) -> torch.Tensor:
        """``x (b, l, d_model)`` -> ``(b, l, d_model)``; see :meth:`momkit.Block.run`."""
        return x + self.branch(x, layout, state)

    def branch(self, x: torch.Tensor, layout: Layout, state: Mamba2State | None = None) -> torch.Tensor:
        """The residual branch of :meth:`run`: the output projection of the gated scan."""
        modality, seq_idx = layout.modality, layout.seq_idx
        z, xBC, dt = self._split_in_proj(self.in_proj(self.norm(x, modality), modality))
        y = self._scan(xBC, dt, modality, seq_idx, state=state)
        spans = self.spans(layout)
        if spans is not None:
            backward = self._scan(reverse_spans(xBC, spans), reverse_spans(dt, spans), modality, spans.segments, "_b")
            y = torch.where(spans.mask[..., None, None], y + reverse_spans(backward, spans), y)
        y = self.gate_norm(y.flatten(-2), z, modality)
        return self.out_proj(y, modality)

    def allocate_state(self, batch_size: int, max_length: int | None = None) -> Mamba2State:
        """Zero decoding state for ``batch_size`` sequences (``max_length`` is accepted and unused: the state
        of a Mamba-2 block does not grow with the sequence)."""
        cfg, weight = self.config, self.in_proj.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        return Mamba2State(conv=torch.zeros(batch_size, cfg.conv_dim, cfg.d_conv, dtype=weight.dtype,
                                            device=weight.device),
                           ssm=torch.zeros(batch_size, cfg.nheads, cfg.headdim, cfg.d_state, dtype=dtype,
                                           device=weight.device))

    def run_step(self, x: torch.Tensor, layout: Layout, state: Mamba2State) -> torch.Tensor:
        """Decode one position: ``x (b, d_model)``, ``layout.modality (b,)``; updates ``state`` in place."""
        modality = layout.modality
        z, xBC, dt = self._split_in_proj(self.in_proj(self.norm(x, modality), modality))
        xs, B, C = self._split_xBC(self.conv1d.step(xBC, state.conv, modality, activation="silu"))
        p, n = self.config.headdim, self.config.d_state

        def over_p(t: torch.Tensor, *extra: int) -> torch.Tensor:
            return t.reshape(*t.shape, *(1,) * (1 + len(extra))).expand(*t.shape, p, *extra)

        routed = any(self.routing(name) is not None for name in ("dt_bias", "A_log", "D"))
        A, D = decay_and_skip(self)
        y = ops.selective_state_update(state.ssm, xs, over_p(dt), over_p(A, n), B, C, D=over_p(D),
                                       dt_bias=over_p(self.dt_bias),
                                       dt_softplus=True, modality=modality if routed else None,
                                       backend=self.backend)
        y = self.gate_norm(y.flatten(-2), z, modality)
        return x + self.out_proj(y, modality)


def flops(config: Mamba2Config, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block; the scan's depend on ``seq_len`` through the chunk length.

    With ``T = min(chunk_size, seq_len)`` the chunk length, ``h`` heads of ``p`` channels (``di = h p``),
    ``g`` groups and state size ``n``, the chunked SSD scan counts per token:

    - intra-chunk (quadratic in ``T``): ``C B^T`` per group, ``2 T g n``; the decay matrix
      ``L_ij = exp(cs_i - cs_j)`` (``cs`` the cumulative sum of ``dt A`` in the chunk) and its product with
      ``C B^T`` per head, ``3 T h``; ``(L * C B^T) @ (dt x)``, ``2 T di``;
    - states: the chunk states ``B^T @ (w x)``, ``2 di n``; the output from the carried state ``C s``,
      ``2 di n``; carrying the state across a chunk, ``2 di n / T``;
    - per head, the step size (bias, softplus, ``dt A``, the cumulative sum, the exponentials): ``8 h``;
      per channel, ``dt x`` and ``w x`` (the input weighted to its chunk's end), scaling the carried output
      and adding it, and the skip ``D x`` (a multiply-add): ``6 di``.

    Full ``T x T`` blocks are counted, as the chunked algorithm computes them; the causal half would halve
    the quadratic terms. ``gate_norm`` counts the gate ``y silu(z)`` (2) and the RMSNorm (4) per channel.
    """
    d, di, h = config.d_model, config.d_inner, config.nheads
    g, n, T = config.ngroups, config.d_state, max(1, min(config.chunk_size, seq_len))
    return {
        "norm": 4.0 * d,
        "in_proj": 2.0 * d * (2 * di + 2 * g * n + h),
        "conv1d": 2.0 * config.conv_dim * config.d_conv,
        "scan": 2.0 * T * g * n + 3.0 * T * h + 2.0 * T * di + 4.0 * di * n + 2.0 * di * n / T
                + 8.0 * h + 6.0 * di,
        "gate_norm": 6.0 * di,
        "out_proj": 2.0 * di * d,
    }


def present(config: Mamba2Config, bidirectional: bool) -> tuple[str, ...]:
    """The sublayers of a block: the backward direction's only when bidirectional."""
    return SUBLAYERS if bidirectional else tuple(s for s in SUBLAYERS if s not in BACKWARD)


@hookimpl
def momkit_backbones():
    return [Backbone(name="mamba2",
                     description="Mamba-2 SSD block; preset mom = Mixture-of-Mamba (in_proj, out_proj)",
                     config=Mamba2Config, block=Mamba2Block, sublayers=SUBLAYERS, presets={"mom": MOM},
                     flops=flops, present=present, backward_flops=("conv1d", "scan"))]

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

``selective`` names which of ``dt``, ``B`` and ``C`` the input makes; the others are the learned per-channel
``dt_bias``, ``B`` and ``C``, fixed in time (none selective: S4D, the ``s4d`` backbone). ``a_init: s4d_lin``
makes ``A``, ``B`` and ``C`` complex (S4D-Lin), run through the real scan as a rotated state of twice the size.
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
from momkit.ssm import SSMConfig, at_least_fp32, decay_and_skip, initial_dt_bias

FIXED = ("dt_bias", "B", "C")
IMAGINARY = ("A_imag", "B_imag", "C_imag")
BACKWARD = ("conv1d_b", "x_proj_b", "dt_proj_b", "A_log_b", "D_b", *(f"{name}_b" for name in (*FIXED, *IMAGINARY)))
SUBLAYERS = ("norm", "in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj", *FIXED, *IMAGINARY,
             *BACKWARD)
MOM = ("in_proj", "x_proj", "dt_proj", "out_proj", "x_proj_b", "dt_proj_b")
SELECTIVE = ("dt", "B", "C")


class MambaConfig(SSMConfig):
    """Options of the ``mamba`` backbone (defaults as in mamba_ssm's ``Mamba`` module)."""

    d_state: int = Field(16, gt=0, description="State size n per channel.")
    dt_rank: int | Literal["auto"] = Field("auto", description="Rank of the dt projection; `auto` is "
                                                               "ceil(d_model / 16).")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the RMSNorm.")
    selective: list[str] = Field(list(SELECTIVE), description="Which of the scan's `dt`, `B` and `C` depend on the "
                                                              "input (made by x_proj and dt_proj); the others are "
                                                              "learned per channel and fixed in time. `[]` is a "
                                                              "time-invariant diagonal SSM, S4D.")
    a_init: str = Field("s4d_real", pattern="^(s4d_real|s4d_lin)$",
                        description="Initialisation of A: `s4d_real`, A_n = -(n + 1) (Mamba's), or `s4d_lin`, the "
                                    "complex A_n = -1/2 + i pi n with complex B and C (S4D-Lin; needs `selective: "
                                    "[]`).")

    @model_validator(mode="after")
    def _rank(self) -> MambaConfig:
        if isinstance(self.dt_rank, int) and self.dt_rank < 1:
            raise SpecError(f"dt_rank must be a positive int or 'auto', got {self.dt_rank}")
        unknown = [name for name in self.selective if name not in SELECTIVE]
        if unknown or len(set(self.selective)) != len(self.selective):
            raise SpecError(f"selective must list distinct names among {', '.join(SELECTIVE)}, got {self.selective}")
        if self.a_init == "s4d_lin" and self.selective:
            raise SpecError(f"a_init s4d_lin (a complex A, with complex B and C fixed in time) takes selective: [], "
                            f"got selective {self.selective}; valid: selective [] or a_init s4d_real")
        return self

    @property
    def complex(self) -> bool:
        """Whether the SSM is complex (S4D-Lin): its state holds a real and an imaginary part per state."""
        return self.a_init == "s4d_lin"

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
    supports_prefill = True
    capturable_step = True
    residual = True

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
            self._init_dt(getattr(self, "dt_proj" + suffix, None))

    def _direction(self, suffix: str) -> None:
        """The sublayers of one scan direction (``suffix`` ``""`` forward, ``"_b"`` backward): ``conv1d``,
        ``x_proj`` (for the selective ones of ``dt``, ``B``, ``C``), ``dt_proj`` (selective ``dt``), ``A_log``,
        ``D``, and the fixed ``dt_bias``, ``B``, ``C`` of those not selective."""
        cfg, backend = self.config, self.backend
        di, n, r = cfg.d_inner, cfg.d_state, cfg.rank

        def sets(name: str) -> int | None:
            return self.routing(name + suffix)

        def copies(name: str) -> tuple[int, ...]:
            return () if sets(name) is None else (self.n_modalities,)

        setattr(self, "conv1d" + suffix, CausalConv1d(di, cfg.d_conv, bias=cfg.conv_bias,
                                                      n_modalities=sets("conv1d"), backend=backend))
        if sum(self._widths):
            setattr(self, "x_proj" + suffix, Linear(di, sum(self._widths), bias=False, n_modalities=sets("x_proj"),
                                                    backend=backend))
        if "dt" in cfg.selective:
            setattr(self, "dt_proj" + suffix, Linear(r, di, bias=True, n_modalities=sets("dt_proj"),
                                                     backend=backend))
        else:
            setattr(self, "dt_bias" + suffix, no_weight_decay(nn.Parameter(
                initial_dt_bias(cfg, copies("dt_bias") + (di,)))))
        scale = 0.5 ** 0.5 if cfg.complex else 1.0
        for name in ("B", "C"):
            if name not in cfg.selective:
                value = torch.ones(*copies(name), di, n) if name == "B" else torch.randn(*copies(name), di, n) * scale
                setattr(self, name + suffix, nn.Parameter(value))
        states = torch.arange(n, dtype=torch.float32)
        real = torch.full((n,), 0.5).log() if cfg.complex else torch.log(states + 1)
        setattr(self, "A_log" + suffix, no_weight_decay(nn.Parameter(real.repeat(*copies("A_log"), di, 1))))
        if cfg.complex:
            setattr(self, "A_imag" + suffix, no_weight_decay(nn.Parameter(
                (math.pi * states).repeat(*copies("A_imag"), di, 1))))
            setattr(self, "B_imag" + suffix, nn.Parameter(torch.zeros(*copies("B_imag"), di, n)))
            setattr(self, "C_imag" + suffix, nn.Parameter(torch.randn(*copies("C_imag"), di, n) * scale))
        setattr(self, "D" + suffix, no_weight_decay(nn.Parameter(torch.ones(*copies("D"), di))))

    @torch.no_grad()
    def _init_dt(self, dt_proj: Linear | None) -> None:
        """Mamba's step-size initialisation: ``softplus(dt_proj.bias)`` log-uniform in [dt_min, dt_max]."""
        if dt_proj is None:
            return
        bound = self.config.rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -bound, bound)
        dt_proj.bias.copy_(initial_dt_bias(self.config, tuple(dt_proj.bias.shape)))

    @property
    def _widths(self) -> list[int]:
        """Widths of x_proj's outputs: the dt projection's input, ``B``, ``C``, each 0 unless selective."""
        cfg = self.config
        return [width * (name in cfg.selective) for name, width in zip(SELECTIVE, (cfg.rank, cfg.d_state,
                                                                                 cfg.d_state))]

    def _scan_inputs(self, u: torch.Tensor, modality: torch.Tensor, suffix: str = ""):
        """``dt (..., d_inner)`` and ``B``, ``C`` of the scan at positions ``u (..., d_inner)``: ``(..., n)`` both
        selective, else ``(..., d_inner, n)`` (one per channel, as the scan's groups)."""
        x_proj = getattr(self, "x_proj" + suffix, None)
        parts = x_proj(u, modality).split(self._widths, dim=-1) if x_proj is not None else ()
        made = {name: part for name, part in zip(SELECTIVE, parts) if name in self.config.selective}
        dt = (getattr(self, "dt_proj" + suffix)(made["dt"], modality) if "dt" in made else
              self._fixed("dt_bias" + suffix, modality))
        B, C = (made.get(name) for name in ("B", "C"))
        if B is None or C is None:
            n = self.config.d_state
            B, C = (self._fixed(name + suffix, modality) if name not in made else
                    made[name][..., None, :].expand(*u.shape, n) for name in ("B", "C"))
        return dt, B, C

    def _fixed(self, name: str, modality: torch.Tensor) -> torch.Tensor:
        """Parameter ``name`` at every position of ``modality (...)``: ``(..., *shape)``, its modality's copy where
        routed."""
        value = getattr(self, name)
        if self.routing(name) is not None:
            return value[modality]
        return value.expand(*modality.shape, *value.shape)

    def _rotated(self, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, A: torch.Tensor, modality: torch.Tensor,
                 suffix: str):
        """The complex SSM (S4D-Lin) as a real scan of twice the state: ``B``, ``C`` ``(b, l, di, 2 n)``, ``A``
        ``(..., 2 n)``, and the phases ``(b, l, di, n)``.

        With ``h_t = exp(dt_t (a + i w)) h_{t-1} + dt_t B u_t`` and ``y_t = 2 Re(C h_t)``, the rotated state
        ``k_t = exp(-i phi_t) h_t`` (``phi_t`` the running sum of ``dt_t w``) decays by the real ``exp(dt_t a)`` and
        takes the input ``exp(-i phi_t) dt_t B u_t``; its real and imaginary parts are the two halves of the
        state, and ``y_t = 2 Re(C exp(i phi_t) k_t)`` reads them with the two halves of ``C``. The phases are summed
        in float64 and wrapped to [0, 2 pi); they start from 0, so a decoding state ``h`` before the first position
        is ``k`` as it is."""
        imag = self._fixed("A_imag" + suffix, modality)
        step = F.softplus(dt.double())
        phase = torch.remainder(torch.cumsum(step[..., None] * imag.double(), dim=1), 2 * math.pi).to(B.dtype)
        cos, sin = phase.cos(), phase.sin()
        B_imag, C_imag = self._fixed("B_imag" + suffix, modality), self._fixed("C_imag" + suffix, modality)
        B = torch.cat([cos * B + sin * B_imag, cos * B_imag - sin * B], dim=-1)
        C = torch.cat([2 * (C * cos - C_imag * sin), -2 * (C * sin + C_imag * cos)], dim=-1)
        return B, C, torch.cat([A, A], dim=-1), phase

    def _scan(self, x_in: torch.Tensor, z: torch.Tensor, modality: torch.Tensor, seq_idx: torch.Tensor | None,
              suffix: str = "", state: MambaState | None = None) -> torch.Tensor:
        """The scan of one direction over ``x_in, z (b, l, d_inner)``, gated: ``(b, l, d_inner)``; from ``state``
        (prefill), which it leaves at the last position."""
        A_log, D = getattr(self, "A_log" + suffix), getattr(self, "D" + suffix)
        conv1d = getattr(self, "conv1d" + suffix)
        u = F.silu(conv1d(x_in, modality, seq_idx) if state is None else conv1d.prefill(x_in, state.conv, modality))
        dt, B, C = self._scan_inputs(u, modality, suffix)
        A = -torch.exp(at_least_fp32(A_log))
        if self.config.complex:
            B, C, A, phase = self._rotated(dt, B, C, A, modality, suffix)
        B, C = (t.mT if t.dim() == 3 else t.permute(0, 2, 3, 1).contiguous() for t in (B, C))
        routed_D = self.routing("D" + suffix) is not None
        y = ops.selective_scan(u.mT, dt.mT, A, B, C, D=None if routed_D else at_least_fp32(D),
                               z=None if routed_D else z.mT, delta_softplus=True, return_last_state=state is not None,
                               modality=None if self.routing("A_log" + suffix) is None else modality,
                               seq_idx=seq_idx, initial_state=None if state is None else state.ssm,
                               backend=self.backend)
        if state is not None:
            y, last = y
            state.ssm.copy_(last if not self.config.complex else _unrotated(last, phase[:, -1]))
        y = y.mT
        if routed_D:
            y = (y + u * D[modality]) * F.silu(z)
        return y

    def run(self, x: torch.Tensor, layout: Layout, state: MambaState | None = None) -> torch.Tensor:
        """``x (b, l, d_model)`` -> ``(b, l, d_model)``; see :meth:`momkit.Block.run` (a ``state`` is prefilled:
        the conv starts from its inputs and the scan from its state)."""
        return x + self.branch(x, layout, state)

    def branch(self, x: torch.Tensor, layout: Layout, state: MambaState | None = None) -> torch.Tensor:
        """The residual branch of :meth:`run`: the output projection of the scan."""
        modality, seq_idx = layout.modality, layout.seq_idx
        x_in, z = self.in_proj(self.norm(x, modality), modality).chunk(2, dim=-1)
        y = self._scan(x_in, z, modality, seq_idx, state=state)
        spans = self.spans(layout)
        if spans is not None:
            backward = self._scan(reverse_spans(x_in, spans), reverse_spans(z, spans), modality, spans.segments, "_b")
            y = torch.where(spans.mask[..., None], y + reverse_spans(backward, spans), y)
        return self.out_proj(y, modality)

    def allocate_state(self, batch_size: int, max_length: int | None = None) -> MambaState:
        """Zero decoding state for ``batch_size`` sequences (``max_length`` is accepted and unused: the state
        of a Mamba block does not grow with the sequence)."""
        weight = self.in_proj.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        di, states = self.config.d_inner, self.config.d_state * (2 if self.config.complex else 1)
        return MambaState(conv=torch.zeros(batch_size, di, self.config.d_conv, dtype=weight.dtype,
                                           device=weight.device),
                          ssm=torch.zeros(batch_size, di, states, dtype=dtype, device=weight.device))

    def run_step(self, x: torch.Tensor, layout: Layout, state: MambaState) -> torch.Tensor:
        """Decode one position: ``x (b, d_model)``, ``layout.modality (b,)``; updates ``state`` in place (with
        ``B`` and ``C`` per channel, through the heads layout of the state update, one channel per head)."""
        modality = layout.modality
        x_in, z = self.in_proj(self.norm(x, modality), modality).chunk(2, dim=-1)
        u = self.conv1d.step(x_in, state.conv, modality, activation="silu")
        dt, B, C = self._scan_inputs(u, modality)
        routed = self.routing("A_log") is not None or self.routing("D") is not None
        A, D = decay_and_skip(self)
        if self.config.complex:
            y = self._complex_step(u, z, dt, B, C, modality, state)
        elif B.dim() == 2:
            y = ops.selective_state_update(state.ssm, u, dt, A, B, C, D=D, z=z, dt_softplus=True,
                                           modality=modality if routed else None, backend=self.backend)
        else:
            y = ops.selective_state_update(state.ssm[:, :, None], u[..., None], dt[..., None], A[..., None, :], B, C,
                                           D=D[..., None], z=z[..., None], dt_softplus=True,
                                           modality=modality if routed else None, backend=self.backend)[..., 0]
        return x + self.out_proj(y, modality)

    def _complex_step(self, u, z, dt, B, C, modality, state: MambaState) -> torch.Tensor:
        """One position of the complex SSM (S4D-Lin) in complex arithmetic; ``state.ssm`` holds the real then the
        imaginary parts of ``h``."""
        n = self.config.d_state
        wide = state.ssm.dtype
        h = torch.complex(state.ssm[..., :n], state.ssm[..., n:])
        step = F.softplus(dt.to(wide))
        A = torch.complex(-torch.exp(self._fixed("A_log", modality).to(wide)), self._fixed("A_imag", modality).to(wide))
        B = torch.complex(B.to(wide), self._fixed("B_imag", modality).to(wide))
        h = torch.exp(step[..., None] * A) * h + (step * u.to(wide))[..., None] * B
        state.ssm[..., :n], state.ssm[..., n:] = h.real, h.imag
        C = torch.complex(C.to(wide), self._fixed("C_imag", modality).to(wide))
        y = 2 * (C * h).real.sum(-1) + u.to(wide) * self._fixed("D", modality).to(wide)
        return (y * F.silu(z.to(wide))).to(u.dtype)


def _unrotated(k: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The complex state ``h = exp(i phase) k`` (real then imaginary halves) of a rotated state ``k (b, di, 2 n)``
    at phases ``phase (b, di, n)``."""
    n = phase.shape[-1]
    cos, sin = phase.cos().to(k.dtype), phase.sin().to(k.dtype)
    real, imag = k[..., :n], k[..., n:]
    return torch.cat([cos * real - sin * imag, sin * real + cos * imag], dim=-1)


def flops(config: MambaConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block (independent of ``seq_len``).

    The scan counts, per channel and state, the decay (a multiply and an exponential), the input
    ``dt B u`` (two multiplies), the update (a multiply-add) and the read-out ``C h`` (a multiply-add): 8;
    the skip, the gate and the softplus of ``dt`` add a few per channel. A complex SSM (S4D-Lin) scans twice the
    states (its real and imaginary parts; the rotation of ``B`` and ``C`` is not counted).
    """
    d, di, n, r = config.d_model, config.d_inner, config.d_state, config.rank
    width = sum(w for name, w in zip(SELECTIVE, (r, n, n)) if name in config.selective)
    n = 2 * n if config.complex else n
    return {
        "norm": 4.0 * d,
        "in_proj": 2.0 * d * 2 * di,
        "conv1d": 2.0 * di * config.d_conv,
        "x_proj": 2.0 * di * width,
        "dt_proj": 2.0 * r * di * ("dt" in config.selective),
        "scan": 8.0 * di * n + 8.0 * di,
        "out_proj": 2.0 * di * d,
    }


def present(config: MambaConfig, bidirectional: bool) -> tuple[str, ...]:
    """The sublayers of a block: ``x_proj`` if anything is selective, ``dt_proj`` or ``dt_bias``, the fixed ``B``
    and ``C`` of those not selective, the imaginary parts of a complex SSM; the backward direction's the same,
    only when bidirectional."""
    selective = config.selective
    names = ["norm", "in_proj", "conv1d", *(["x_proj"] if selective else []),
             "dt_proj" if "dt" in selective else "dt_bias", *(name for name in ("B", "C") if name not in selective),
             "A_log", "D", *(IMAGINARY if config.complex else ())]
    return (*names, "out_proj", *(f"{name}_b" for name in names[2:] if bidirectional))


class S4DConfig(MambaConfig):
    """Options of the ``s4d`` backbone: the ``mamba`` backbone's, with nothing selective by default."""

    selective: list[str] = Field(default_factory=list, description="Which of `dt`, `B` and `C` depend on the "
                                                                   "input; none (S4D) by default.")


@hookimpl
def momkit_backbones():
    backward_flops = ("conv1d", "x_proj", "dt_proj", "scan")
    return [Backbone(name="mamba", description="Mamba-1 selective SSM block; preset mom = Mixture-of-Mamba",
                     config=MambaConfig, block=MambaBlock, sublayers=SUBLAYERS, presets={"mom": MOM},
                     flops=flops, present=present, backward_flops=backward_flops),
            Backbone(name="s4d", description="time-invariant diagonal SSM (S4D-Real, or S4D-Lin with a_init) in the "
                                             "Mamba block: selective: []", config=S4DConfig, block=MambaBlock,
                     sublayers=SUBLAYERS, presets={"mom": MOM}, flops=flops, present=present,
                     backward_flops=backward_flops)]

"""The Transformer backbones with modality routing: Mixture-of-Transformers (Liang et al. 2024).

Three backbones: ``transformer``, whose block is two pre-norm residual layers, attention then a SwiGLU
feed-forward network, and its two halves on their own, ``attention`` and ``ffn``, for layer stacks (Mamba with
attention every k-th layer, Mamba alternating with feed-forward layers)::

    x ─ attn_norm ─┬─ q_proj ─ rope ─┐
                   ├─ k_proj ─ rope ─┼─ causal self-attention ─ o_proj ─ + x ─ h
                   └─ v_proj ────────┘
    h ─ ffn_norm ─ ffn ─ + h ─ y

The attention is global: every token attends to every earlier token of its sequence (of its document, with
``seq_idx``), whatever the modalities, and it has no weights, so it is always shared. Rotary position
embeddings (RoPE) use the half-split convention: channels ``i`` and ``i + head_dim / 2`` of a head form pair
``i``, rotated by the angle ``position * rope_theta ** (-2 i / head_dim)``. With ``n_kv_heads < n_heads``
(grouped-query attention) query head ``j`` reads key/value head ``j // (n_heads / n_kv_heads)``.

With bidirectional modalities (the spec's ``bidirectional``) a position inside a span (a run of one such
modality within one document: one image) also attends to the later positions of its span, as Transfusion's
intra-image attention does; every other position stays causal.

Every sublayer can be routed. The ``mot`` preset routes all of them, and in a model the final norm too, as
in the Mixture-of-Transformers paper: every non-embedding parameter (the four attention projections, the
feed-forward network and the norms) is modality-specific, while the self-attention over the whole
interleaved sequence stays shared. The ``ffn`` backbone's sublayers are ``norm`` and the SwiGLU's three
matrices ``w1``, ``w2`` and ``w3``, each routable on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from momkit import hookimpl
from momkit.blocks import Block, Layout
from momkit.configs import BackboneConfig, divisors
from momkit.descriptors import Backbone
from momkit.errors import SpecError
from momkit.routing import Linear, RMSNorm

ATTENTION = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("norm", "w1", "w2", "w3")
SUBLAYERS = (*ATTENTION, "ffn_norm", "ffn")
FFN_MULTIPLE = 8
DEFAULT_CAPACITY = 256


class AttentionConfig(BackboneConfig):
    """Options of the ``attention`` backbone (RoPE base and norm epsilon as in LLaMA)."""

    n_heads: int = Field(8, gt=0, description="Query heads; head_dim = d_model / n_heads, which must be even "
                                              "for the rotary embedding.")
    n_kv_heads: int | None = Field(None, gt=0, description="Key/value heads, each shared by n_heads / n_kv_heads "
                                                           "query heads (grouped-query attention); `None` is "
                                                           "n_heads (multi-head attention).")
    rope_theta: float = Field(10000.0, gt=0, description="Base of the rotary position embedding's angles.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the RMSNorm.")

    @model_validator(mode="after")
    def _heads(self) -> AttentionConfig:
        valid_heads = ", ".join(str(k) for k in divisors(self.d_model) if self.d_model // k % 2 == 0) or "none"
        if self.d_model % self.n_heads:
            raise SpecError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}) with an even "
                            f"head_dim; valid n_heads: {valid_heads}")
        if self.head_dim % 2:
            raise SpecError(f"head_dim = d_model / n_heads = {self.d_model} / {self.n_heads} = {self.head_dim} "
                            f"must be even for the rotary embedding; valid n_heads: {valid_heads}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise SpecError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}); valid "
                            f"n_kv_heads: {', '.join(map(str, divisors(self.n_heads)))}")
        return self

    @property
    def head_dim(self) -> int:
        """Channels per head: ``d_model / n_heads``."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads, ``n_kv_heads`` resolved."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


class FFNConfig(BackboneConfig):
    """Options of the ``ffn`` backbone (feed-forward sizing as in LLaMA)."""

    ffn_mult: float = Field(8 / 3, gt=0, description="Hidden width of the SwiGLU feed-forward network: "
                                                     "int(ffn_mult * d_model) rounded up to a multiple of 8.")
    ffn_dim: int | None = Field(None, gt=0, description="Hidden width of the feed-forward network, exactly, in "
                                                        "place of the width ffn_mult gives (a pretrained model's "
                                                        "`intermediate_size`).")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the RMSNorm.")

    @model_validator(mode="after")
    def _width(self) -> FFNConfig:
        if int(self.ffn_mult * self.d_model) < 1:
            raise SpecError(f"ffn_mult * d_model = {self.ffn_mult} * {self.d_model} must be at least 1 for a "
                            f"feed-forward network of positive width; valid ffn_mult: >= {1 / self.d_model}")
        return self

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the feed-forward network: ``ffn_dim`` if given, else ``int(ffn_mult * d_model)`` rounded
        up to a multiple of 8."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        return math.ceil(int(self.ffn_mult * self.d_model) / FFN_MULTIPLE) * FFN_MULTIPLE


class TransformerConfig(AttentionConfig, FFNConfig):
    """Options of the ``transformer`` backbone: the ``attention`` backbone's and the ``ffn`` backbone's."""

    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of both RMSNorms.")


@dataclass
class TransformerState:
    """Decoding state of one block: the KV cache of the positions fed so far, every row in lockstep.

    The keys are stored rotated (RoPE applied at their positions). ``append`` doubles the capacity when the
    cache is full, so decoding may run past the allocated length.
    """

    keys: torch.Tensor  # (b, n_kv_heads, capacity, head_dim), positions [0, length) filled
    values: torch.Tensor  # (b, n_kv_heads, capacity, head_dim)
    length: int = 0  # positions fed so far, the same for every row; the position of the next one

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v (b, n_kv_heads, s, head_dim)`` at positions ``length`` on; return the keys and values of
        every position fed, ``(b, n_kv_heads, length, head_dim)`` each (views into the cache)."""
        while self.length + k.shape[2] > self.keys.shape[2]:
            self.keys = torch.cat([self.keys, torch.zeros_like(self.keys)], dim=2)
            self.values = torch.cat([self.values, torch.zeros_like(self.values)], dim=2)
        self.keys[:, :, self.length:self.length + k.shape[2]] = k
        self.values[:, :, self.length:self.length + k.shape[2]] = v
        self.length += k.shape[2]
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]


class SwiGLU(nn.Module):
    """``y = w2(silu(w1 x) * w3 x)``, the three linear maps all shared or all routed by modality."""

    def __init__(self, dim: int, hidden: int, n_modalities: int | None = None, backend: str = "auto"):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False, n_modalities=n_modalities, backend=backend)
        self.w3 = Linear(dim, hidden, bias=False, n_modalities=n_modalities, backend=backend)
        self.w2 = Linear(hidden, dim, bias=False, n_modalities=n_modalities, backend=backend)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``x (..., d)``, ``modality (...)`` -> ``(..., d)``."""
        return swiglu(x, modality, self.w1, self.w3, self.w2)


def swiglu(x: torch.Tensor, modality: torch.Tensor, w1: Linear, w3: Linear, w2: Linear) -> torch.Tensor:
    """``w2(silu(w1 x) * w3 x)`` for ``x (..., d)``, ``modality (...)``."""
    return w2(F.silu(w1(x, modality)) * w3(x, modality), modality)


def rotary(t: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding, half-split: ``t (b, h, l, e)``, ``positions (b, l)`` -> ``(b, h, l, e)``.

    Pair ``i`` (channels ``i`` and ``i + e / 2``) is rotated by ``positions * theta ** (-2 i / e)``; the
    angles are computed in at least float32.
    """
    half = t.shape[-1] // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    inv_freq = theta ** (-2 * torch.arange(half, dtype=dtype, device=t.device) / t.shape[-1])
    angle = positions[:, None, :, None].to(dtype) * inv_freq
    cos, sin = angle.cos(), angle.sin()
    t1, t2 = t.to(dtype).split(half, dim=-1)
    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1).to(t.dtype)


def document_layout(seq_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions within each document and the attention mask of packed documents.

    ``seq_idx (b, l)`` -> ``positions (b, l)`` (0 at each document's first position) and ``mask (b, 1, l, l)``,
    ``True`` where query ``i`` may attend to key ``j``: ``j <= i`` in the same document. A document is a run
    of equal ``seq_idx``.
    """
    b, l = seq_idx.shape
    start = torch.ones_like(seq_idx, dtype=torch.bool)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    document = start.cumsum(dim=1)
    index = torch.arange(l, device=seq_idx.device).expand(b, l)
    positions = index - torch.where(start, index, 0).cummax(dim=1).values
    causal = torch.ones(l, l, dtype=torch.bool, device=seq_idx.device).tril()
    return positions, ((document[:, :, None] == document[:, None, :]) & causal)[:, None]


class AttentionBlock(Block):
    """One pre-norm causal self-attention layer whose sublayers are shared or routed as the spec says."""

    config: AttentionConfig
    supports_bidirectional = True
    supports_prefill = True
    residual = True

    def __init__(self, config: AttentionConfig, modalities: list[str], routed: frozenset[str],
                 backend: str = "auto", *, bidirectional: tuple[str, ...] = ()):
        super().__init__(config, modalities, routed, backend, bidirectional=bidirectional)
        d, e = config.d_model, config.head_dim

        def linear(sublayer: str, in_features: int, out_features: int) -> Linear:
            return Linear(in_features, out_features, bias=False, n_modalities=self.routing(sublayer), backend=backend)

        self.attn_norm = RMSNorm(d, eps=config.norm_eps, n_modalities=self.routing("attn_norm"))
        self.q_proj = linear("q_proj", d, config.n_heads * e)
        self.k_proj = linear("k_proj", d, config.kv_heads * e)
        self.v_proj = linear("v_proj", d, config.kv_heads * e)
        self.o_proj = linear("o_proj", config.n_heads * e, d)

    def _qkv(self, x: torch.Tensor, modality: torch.Tensor, positions: torch.Tensor):
        """``x (b, l, d_model)`` -> rotated ``q (b, n_heads, l, e)``, rotated ``k`` and ``v (b, n_kv_heads, l, e)``."""
        h = self.attn_norm(x, modality)
        e, theta = self.config.head_dim, self.config.rope_theta
        q = self.q_proj(h, modality).unflatten(-1, (-1, e)).transpose(1, 2)
        k = self.k_proj(h, modality).unflatten(-1, (-1, e)).transpose(1, 2)
        v = self.v_proj(h, modality).unflatten(-1, (-1, e)).transpose(1, 2)
        return rotary(q, positions, theta), rotary(k, positions, theta), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        """``q (b, n_heads, l, e)``, ``k, v (b, n_kv_heads, s, e)`` -> ``(b, l, n_heads * e)``; each key/value head
        serves ``n_heads / n_kv_heads`` consecutive query heads."""
        group = self.config.n_heads // self.config.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return o.transpose(1, 2).flatten(2)

    def run(self, x: torch.Tensor, layout: Layout, state: TransformerState | None = None) -> torch.Tensor:
        """``x (b, l, d_model)`` -> ``x + attention``, ``(b, l, d_model)``; see :meth:`momkit.Block.run` (a
        ``state`` is prefilled: the positions attend to its cache too, and their keys and values join it)."""
        return x + self.branch(x, layout, state)

    def branch(self, x: torch.Tensor, layout: Layout, state: TransformerState | None = None) -> torch.Tensor:
        """The residual branch of :meth:`run`: the attention's output projection."""
        if state is not None:
            return self._prefill(x, layout, state)
        modality, seq_idx = layout.modality, layout.seq_idx
        spans = self.spans(layout)
        if seq_idx is None and spans is None:
            positions, mask = torch.arange(x.shape[1], device=x.device).expand(x.shape[:2]), None
        else:
            positions, mask = document_layout(torch.zeros_like(modality) if seq_idx is None else seq_idx)
        if spans is not None:
            mask = mask | ((spans.ids[:, :, None] == spans.ids[:, None, :]) & spans.mask[:, :, None])[:, None]
        q, k, v = self._qkv(x, modality, positions)
        return self.o_proj(self._attend(q, k, v, mask, causal=mask is None), modality)

    def _prefill(self, x: torch.Tensor, layout: Layout, state: TransformerState) -> torch.Tensor:
        """The attention output of positions ``x (b, l, d_model)`` after those in ``state``'s cache, which they
        join."""
        modality, length = layout.modality, x.shape[1]
        index = torch.arange(length, device=x.device)
        q, k, v = self._qkv(x, modality, (state.length + index).expand(x.shape[:2]))
        cached = state.length
        keys, values = state.append(k, v)
        mask = torch.ones(x.shape[0], 1, length, cached + length, dtype=torch.bool, device=x.device)
        mask[..., cached:] = index[:, None] >= index[None, :]
        spans = self.spans(layout)
        if spans is not None:
            mask[..., cached:] |= ((spans.ids[:, :, None] == spans.ids[:, None, :]) & spans.mask[:, :, None])[:, None]
        return self.o_proj(self._attend(q, keys.to(q.dtype), values.to(q.dtype), mask, causal=False), modality)

    def allocate_state(self, batch_size: int, max_length: int | None = None) -> TransformerState:
        """An empty KV cache for ``batch_size`` sequences with room for ``max_length`` positions (``None``:
        256); it doubles whenever a step finds it full, so any number of steps works."""
        capacity = DEFAULT_CAPACITY if max_length is None else max_length
        if capacity < 1:
            raise SpecError(f"max_length must be a positive int or None, got {max_length}")
        weight, cfg = self.k_proj.weight, self.config
        shape = (batch_size, cfg.kv_heads, capacity, cfg.head_dim)
        return TransformerState(keys=torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                                values=torch.zeros(shape, dtype=weight.dtype, device=weight.device))

    def run_step(self, x: torch.Tensor, layout: Layout, state: TransformerState) -> torch.Tensor:
        """Decode one position: ``x (b, d_model)``, ``layout.modality (b,)``; appends its key and value to
        ``state``."""
        modality = layout.modality
        positions = torch.full((x.shape[0], 1), state.length, device=x.device)
        q, k, v = self._qkv(x[:, None], modality[:, None], positions)
        keys, values = state.append(k, v)
        o = self._attend(q, keys.to(q.dtype), values.to(q.dtype), mask=None, causal=False)[:, 0]
        return x + self.o_proj(o, modality)


class TransformerBlock(AttentionBlock):
    """One Transformer layer (attention and SwiGLU) whose sublayers are shared or routed as the spec says."""

    config: TransformerConfig

    def __init__(self, config: TransformerConfig, modalities: list[str], routed: frozenset[str],
                 backend: str = "auto", *, bidirectional: tuple[str, ...] = ()):
        super().__init__(config, modalities, routed, backend, bidirectional=bidirectional)
        self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps, n_modalities=self.routing("ffn_norm"))
        self.ffn = SwiGLU(config.d_model, config.ffn_hidden, n_modalities=self.routing("ffn"), backend=backend)

    def branch(self, x: torch.Tensor, layout: Layout, state: TransformerState | None = None) -> torch.Tensor:
        """The residual branch of :meth:`run` (the attention's and the feed-forward network's outputs): ``a +
        ffn(norm(x + a))`` for ``a`` the attention's."""
        a = super().branch(x, layout, state)
        return a + self.ffn(self.ffn_norm(x + a, layout.modality), layout.modality)

    def run_step(self, x: torch.Tensor, layout: Layout, state: TransformerState) -> torch.Tensor:
        """Decode one position: ``x (b, d_model)``, ``layout.modality (b,)``; appends its key and value to
        ``state``."""
        h = super().run_step(x, layout, state)
        return h + self.ffn(self.ffn_norm(h, layout.modality), layout.modality)


class FFNBlock(Block):
    """One pre-norm SwiGLU feed-forward layer, ``y = x + w2(silu(w1 n) * w3 n)`` with ``n = norm(x)``, whose
    four sublayers are shared or routed as the spec says. Position-wise: it keeps no decoding state."""

    config: FFNConfig
    position_wise = True
    supports_prefill = True
    capturable_step = True
    residual = True

    def __init__(self, config: FFNConfig, modalities: list[str], routed: frozenset[str], backend: str = "auto"):
        super().__init__(config, modalities, routed, backend)
        d, f = config.d_model, config.ffn_hidden
        self.norm = RMSNorm(d, eps=config.norm_eps, n_modalities=self.routing("norm"))
        self.w1 = Linear(d, f, bias=False, n_modalities=self.routing("w1"), backend=backend)
        self.w3 = Linear(d, f, bias=False, n_modalities=self.routing("w3"), backend=backend)
        self.w2 = Linear(f, d, bias=False, n_modalities=self.routing("w2"), backend=backend)

    def run(self, x: torch.Tensor, layout: Layout, state: None = None) -> torch.Tensor:
        """``x (b, l, d_model)`` -> ``(b, l, d_model)``; see :meth:`momkit.Block.run`."""
        return x + self.branch(x, layout)

    def branch(self, x: torch.Tensor, layout: Layout, state: None = None) -> torch.Tensor:
        """The residual branch of :meth:`run`: ``w2(silu(w1 n) * w3 n)``."""
        return swiglu(self.norm(x, layout.modality), layout.modality, self.w1, self.w3, self.w2)

    def run_step(self, x: torch.Tensor, layout: Layout, state: None) -> torch.Tensor:
        """One position, ``x (b, d_model)``: the same map as :meth:`run`."""
        return self.run(x, layout)

    def allocate_state(self, batch_size: int, max_length: int | None = None) -> None:
        """No state: the layer is position-wise."""
        return None


def attention_flops(config: AttentionConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one attention layer; they grow with ``seq_len``.

    With ``d = d_model``, ``h`` query heads and ``g`` key/value heads of ``e`` channels (``h e = d``): each
    matmul of ``in -> out`` features counts ``2 in out`` and the RMSNorm ``4 d``. ``attention`` counts the score
    product ``q k^T`` and the value product ``p v``, ``2 e`` each per head and key, over the causal average
    context of ``seq_len / 2`` keys: ``2 * 2 * d * seq_len / 2`` (grouped-query attention shares keys, not
    products, so ``g`` does not enter). The softmax and the rotary embedding are elementwise, ``O(d)`` against
    ``O(d^2)``, and are not counted.
    """
    d, e = config.d_model, config.head_dim
    h, g = config.n_heads, config.kv_heads
    return {
        "attn_norm": 4.0 * d,
        "q_proj": 2.0 * d * h * e,
        "k_proj": 2.0 * d * g * e,
        "v_proj": 2.0 * d * g * e,
        "attention": 2.0 * 2.0 * h * e * seq_len / 2,
        "o_proj": 2.0 * h * e * d,
    }


def ffn_flops(config: FFNConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one feed-forward layer of width ``f``: ``4 d`` for the RMSNorm, ``2 d f`` for
    each of the three matrices (the SwiGLU gate, elementwise, is not counted)."""
    d, f = config.d_model, config.ffn_hidden
    return {"norm": 4.0 * d, "w1": 2.0 * d * f, "w2": 2.0 * f * d, "w3": 2.0 * d * f}


def flops(config: TransformerConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one Transformer block: :func:`attention_flops`, then ``ffn_norm`` (``4 d``)
    and ``ffn``, the three matrices of :func:`ffn_flops` together."""
    return {**attention_flops(config, seq_len), "ffn_norm": 4.0 * config.d_model,
            "ffn": 3 * 2.0 * config.d_model * config.ffn_hidden}


@hookimpl
def momkit_backbones():
    return [
        Backbone(name="transformer", description="Transformer block (RoPE, GQA, SwiGLU); preset mot = "
                                                 "Mixture-of-Transformers", config=TransformerConfig,
                 block=TransformerBlock, sublayers=SUBLAYERS, presets={"mot": (*SUBLAYERS, "final_norm")},
                 flops=flops),
        Backbone(name="attention", description="the Transformer's attention layer alone, for stacks; preset mot = "
                                               "every sublayer", config=AttentionConfig, block=AttentionBlock,
                 sublayers=ATTENTION, presets={"mot": (*ATTENTION, "final_norm")}, flops=attention_flops),
        Backbone(name="ffn", description="SwiGLU feed-forward layer alone, for stacks; preset mot = every "
                                         "sublayer", config=FFNConfig, block=FFNBlock, sublayers=FFN,
                 presets={"mot": (*FFN, "final_norm")}, flops=ffn_flops),
    ]

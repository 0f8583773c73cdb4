"""The Transformer block: MoT and dense from one spec, a naive attention reference with RoPE and packed
documents, a KV cache that grows, config validation, FLOPs and accounting (the block contract it shares with the
other backbones, the KV-cache step path equal to the full forward among it, is in test_block_contract.py)."""

import math

import pytest
import torch
from pydantic import ValidationError

import momkit
from momkit.accounting import account
from momkit.plugins.transformer import document_layout, rotary
from momkit.registry import get_registry
from momkit.spec import ModelSpec

ALL = ["attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "ffn_norm", "ffn"]
D_MODEL = 32


def block_spec(specific, modalities=("text", "image"), **options):
    return {"modalities": list(modalities), "routing": {"specific": specific},
            "backbone": {"kind": "transformer", "d_model": D_MODEL, "n_heads": 4, **options}}


def build(specific, gen, **kwargs):
    """A float64 block whose every parameter is random (so that no two modality copies coincide)."""
    block = momkit.build_block(block_spec(specific, **kwargs)).double()
    with torch.no_grad():
        for name, p in block.named_parameters():
            scale = 1.0 if "norm" in name else 0.3
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return block


def inputs(gen, batch=2, length=23, n_modalities=2):
    x = torch.randn(batch, length, D_MODEL, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, n_modalities, (batch, length), generator=gen)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_the_spec_from_the_brief_builds_a_mot_block():
    block = momkit.build_block({"modalities": ["text", "image"],
                                "backbone": {"kind": "transformer", "d_model": 32, "n_heads": 4},
                                "routing": {"specific": "mot"}})
    assert block.routed == frozenset(ALL)
    assert block.q_proj.weight.shape == (2, 32, 32)
    assert block.ffn.w1.weight.shape == (2, 88, 32)  # int(8/3 * 32) = 85, rounded up to a multiple of 8
    assert block.attn_norm.weight.shape == (2, 32)
    assert get_registry().get("backbone", "transformer").preset("mot") == (*ALL, "final_norm")


def test_mot_routes_the_final_norm_of_a_model_and_dense_none():
    spec = {"name": "m", "modalities": ["text", "image"], "routing": {"specific": "mot"},
            "backbone": {"kind": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 4}}
    assert ModelSpec.model_validate(spec).routed == frozenset([*ALL, "final_norm"])
    assert ModelSpec.model_validate({**spec, "routing": {"specific": "dense"}}).routed == frozenset()


def test_mot_holds_one_extra_copy_of_every_sublayer():
    mot = momkit.build_block(block_spec("mot", n_kv_heads=2))
    dense = momkit.build_block(block_spec("dense", n_kv_heads=2))
    assert count(mot) == count(dense) + sum(count(getattr(dense, name)) for name in ALL) == 2 * count(dense)
    for name, p in dense.named_parameters():
        assert mot.get_parameter(name).shape == (2, *p.shape), name
    assert dense.k_proj.weight.shape == (2 * 8, 32)


@pytest.mark.parametrize("max_length", [None, 1, 5])
def test_the_cache_grows_past_its_capacity(gen, max_length):
    block = build("mot", gen, n_kv_heads=2)
    x, modality = inputs(gen, length=13)
    state = block.allocate_state(x.shape[0], max_length)
    steps = torch.stack([block.step(x[:, t], modality[:, t], state) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(steps, block(x, modality), rtol=1e-12, atol=1e-12)
    assert state.keys.shape[2] == {None: 256, 1: 16, 5: 20}[max_length]
    assert state.values.shape == state.keys.shape


def test_allocate_state_rejects_a_nonpositive_max_length():
    with pytest.raises(ValueError, match="max_length must be a positive int or None, got 0"):
        momkit.build_block(block_spec("mot")).allocate_state(2, 0)


def rotate(t, positions, theta):
    """Half-split RoPE via complex numbers: channel i + 1j * channel i + e/2, times exp(1j * pos * freq_i)."""
    half = t.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / t.shape[-1])
    angle = positions[..., None] * freq
    z = torch.complex(t[..., :half], t[..., half:]) * torch.complex(angle.cos(), angle.sin())
    return torch.cat([z.real, z.imag], dim=-1)


def naive_block(block, x, modality, seq_idx=None):
    """The block written out position by position: softmax(q k^T / sqrt(e) + mask) v per head."""
    cfg = block.config
    b, l, _ = x.shape
    seq_idx = torch.zeros(b, l, dtype=torch.int64) if seq_idx is None else seq_idx
    h = block.attn_norm(x, modality)
    q = block.q_proj(h, modality).view(b, l, cfg.n_heads, cfg.head_dim)
    k = block.k_proj(h, modality).view(b, l, cfg.kv_heads, cfg.head_dim)
    v = block.v_proj(h, modality).view(b, l, cfg.kv_heads, cfg.head_dim)
    out = torch.zeros(b, l, cfg.n_heads, cfg.head_dim, dtype=x.dtype)
    for row in range(b):
        starts = [t for t in range(l) if t == 0 or seq_idx[row, t] != seq_idx[row, t - 1]]
        positions = torch.tensor([t - max(s for s in starts if s <= t) for t in range(l)], dtype=torch.float64)
        qr, kr = rotate(q[row], positions[:, None], cfg.rope_theta), rotate(k[row], positions[:, None],
                                                                            cfg.rope_theta)
        allowed = torch.tensor([[j <= i and seq_idx[row, j] == seq_idx[row, i] for j in range(l)]
                                for i in range(l)])
        mask = torch.zeros(l, l, dtype=x.dtype).masked_fill(~allowed, -math.inf)
        for head in range(cfg.n_heads):
            kv = head // (cfg.n_heads // cfg.kv_heads)
            scores = qr[:, head] @ kr[:, kv].T / math.sqrt(cfg.head_dim) + mask
            out[row, :, head] = torch.softmax(scores, dim=-1) @ v[row, :, kv]
    y = x + block.o_proj(out.flatten(2), modality)
    g = block.ffn_norm(y, modality)
    w1, w2, w3 = (getattr(block.ffn, w) for w in ("w1", "w2", "w3"))
    return y + w2(torch.nn.functional.silu(w1(g, modality)) * w3(g, modality), modality)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_attention_equals_a_naive_reference(gen, n_kv_heads):
    block = build("mot", gen, n_kv_heads=n_kv_heads, rope_theta=100.0)
    x, modality = inputs(gen, length=17)
    torch.testing.assert_close(block(x, modality), naive_block(block, x, modality), rtol=1e-12, atol=1e-12)
    seq_idx = torch.tensor([[0] * 6 + [1] * 11, [3] * 2 + [4] * 9 + [7] * 6])
    torch.testing.assert_close(block(x, modality, seq_idx), naive_block(block, x, modality, seq_idx),
                               rtol=1e-12, atol=1e-12)


def test_document_layout_restarts_positions_and_masks_other_documents():
    positions, mask = document_layout(torch.tensor([[4, 4, 4, 7, 7, 9], [0, 0, 0, 0, 0, 0]]))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    documents = torch.block_diag(torch.ones(3, 3), torch.ones(2, 2), torch.ones(1, 1)).bool()
    assert torch.equal(mask[0, 0], documents.tril()) and torch.equal(mask[1, 0], torch.ones(6, 6).bool().tril())


def test_rotary_scores_depend_on_the_relative_position_only(gen):
    q, k = torch.randn(2, 1, 3, 1, 8, generator=gen, dtype=torch.float64).unbind(0)

    def score(i, j):
        return float(rotary(q, torch.tensor([[i]]), 100.0).flatten() @ rotary(k, torch.tensor([[j]]), 100.0).flatten())

    assert score(7, 3) == pytest.approx(score(4, 0), rel=1e-12) == pytest.approx(score(1000, 996), rel=1e-12)
    assert abs(score(7, 3) - score(7, 4)) > 1e-3
    torch.testing.assert_close(rotary(q, torch.tensor([[5]]), 100.0).norm(), q.norm(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("options,message", [
    ({"n_heads": 5}, r"n_heads \(5\) must divide d_model \(32\) with an even head_dim; valid n_heads: "
                     r"1, 2, 4, 8, 16 \["),
    ({"n_heads": 32}, r"head_dim = d_model / n_heads = 32 / 32 = 1 must be even .* valid n_heads: 1, 2, 4, 8, 16"),
    ({"n_kv_heads": 3}, r"n_kv_heads \(3\) must divide n_heads \(4\); valid n_kv_heads: 1, 2, 4"),
    ({"n_kv_heads": 0}, r"n_kv_heads\n.*greater than 0"),
    ({"ffn_mult": 0.01}, r"ffn_mult \* d_model = 0.01 \* 32 must be at least 1"),
    ({"ffn_mult": -1}, r"ffn_mult\n.*greater than 0"),
    ({"rope_theta": 0}, r"rope_theta\n.*greater than 0"),
    ({"n_head": 4}, r"unknown field\(s\) 'n_head' for TransformerConfig; valid fields: .*n_heads"),
])
def test_bad_options_are_clear_validation_errors(options, message):
    with pytest.raises(ValidationError, match=message):
        momkit.build_block(block_spec("mot", **options))


def test_flops_per_token():
    config = momkit.build_block(block_spec("mot", n_kv_heads=2)).config
    flops = get_registry().get("backbone", "transformer").flops(config, 100)
    d, f = 32, 88
    assert flops == {"attn_norm": 4 * d, "q_proj": 2 * d * d, "k_proj": 2 * d * 16, "v_proj": 2 * d * 16,
                     "attention": 2 * 2 * d * 100 / 2, "o_proj": 2 * d * d, "ffn_norm": 4 * d,
                     "ffn": 3 * 2 * d * f}


def test_accounting_of_a_mot_model():
    spec = ModelSpec.model_validate({"name": "mot", "modalities": ["text", "image"], "routing": {"specific": "mot"},
                                     "backbone": {"kind": "transformer", "d_model": 32, "n_layers": 2,
                                                  "n_heads": 4}})
    result = account(spec, seq_len=64)
    dense_block = count(momkit.build_block(block_spec("dense")))
    assert sum(s.total for s in result.sublayers) == 2 * (2 * dense_block + 32)
    assert all(s.routed for s in result.sublayers)
    assert result.blocks_active == 2 * dense_block + 32

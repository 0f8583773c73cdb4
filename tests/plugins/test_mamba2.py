"""The Mamba-2 block: MoM and dense from one spec, its widths and initialisation, the SSD semantics, the state
dtypes, config validation, FLOPs and accounting (the block contract it shares with the other backbones is in
test_block_contract.py)."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from einops import rearrange
from pydantic import ValidationError

import momkit
from momkit.kernels.reference.naive import naive_ssd_scan
from momkit.spec import ModelSpec

DOCS = Path(__file__).parents[2] / "docs" / "backbones" / "mamba2.md"
ALL = ["norm", "in_proj", "conv1d", "dt_bias", "A_log", "D", "gate_norm", "out_proj"]


def block_spec(specific, modalities=("text", "image"), d_model=16, **options):
    backbone = {"kind": "mamba2", "d_model": d_model, "d_state": 4, "expand": 2, "headdim": 8, "chunk_size": 8,
                **options}
    return {"modalities": list(modalities), "routing": {"specific": specific}, "scan_backend": "reference",
            "backbone": backbone}


def build(specific, gen, **kwargs):
    """A float64 block whose every parameter is random (so that no two modality copies coincide)."""
    block = momkit.build_block(block_spec(specific, **kwargs)).double()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.3 if "A_log" not in name else 1.0))
    return block


def inputs(gen, batch=2, length=23, d_model=16, n_modalities=2):
    x = torch.randn(batch, length, d_model, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, n_modalities, (batch, length), generator=gen)


def count(module):
    return sum(p.numel() for p in module.parameters())


def docs_spec():
    """The model spec of the docs page's YAML example."""
    text = DOCS.read_text(encoding="utf-8")
    return ModelSpec.model_validate(yaml.safe_load(re.search(r"```yaml[^\n]*\n(.*?)```", text, re.S)[1]))


def test_mom_and_dense_from_one_spec_differ_by_one_copy_of_in_proj_and_out_proj():
    spec = docs_spec()
    assert spec.backbone.kind == "mamba2" and spec.routing.specific == "mom"
    mom = momkit.build_block(spec)
    dense = momkit.build_block(spec.model_copy(update={"routing": momkit.RoutingSpec(specific="dense")}))
    assert count(mom) == count(dense) + count(dense.in_proj) + count(dense.out_proj)
    assert mom.in_proj.weight.shape == (2, *dense.in_proj.weight.shape)
    assert mom.out_proj.weight.shape == (2, *dense.out_proj.weight.shape)
    for name in ("conv1d", "norm", "gate_norm"):
        assert count(getattr(mom, name)) == count(getattr(dense, name)), name
    for name in ("A_log", "D", "dt_bias"):
        assert getattr(mom, name).shape == getattr(dense, name).shape == (spec.backbone.nheads,), name


def test_in_proj_and_conv_widths():
    block = momkit.build_block(block_spec("dense", ngroups=2))
    cfg = block.config
    assert (cfg.d_inner, cfg.nheads, cfg.conv_dim) == (32, 4, 32 + 2 * 2 * 4)
    assert block.in_proj.weight.shape == (2 * 32 + 2 * 2 * 4 + 4, 16)
    assert block.conv1d.weight.shape == (cfg.conv_dim, cfg.d_conv)
    assert block.gate_norm.weight.shape == (32,) and block.gate_norm.group_size == 16


def test_mamba2_initialisation():
    block = momkit.build_block(block_spec(ALL, d_model=64, headdim=4))
    cfg = block.config
    A = torch.exp(block.A_log)
    assert A.shape == (2, 32) and A.min() >= 1 and A.max() <= 16 and A.std() > 1
    dt = F.softplus(block.dt_bias)
    assert dt.shape == (2, 32)
    assert dt.min() >= cfg.dt_init_floor * 0.999 and dt.max() <= cfg.dt_max * 1.001 and dt.max() > 10 * dt.min()
    assert torch.equal(block.D, torch.ones_like(block.D))
    assert torch.equal(block.gate_norm.weight, torch.ones_like(block.gate_norm.weight))


def reference_mixer(block, x):
    """A dense Mamba-2 layer from plain torch ops and the per-token SSD recurrence: ``(b, l, d) -> (b, l, d)``."""
    cfg = block.config
    di, gn, k, length = cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.d_conv, x.shape[1]
    u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * block.norm.weight
    z, xBC, dt = F.linear(u, block.in_proj.weight, block.in_proj.bias).split([di, di + 2 * gn, cfg.nheads], -1)
    conv = F.conv1d(xBC.mT, block.conv1d.weight[:, None], block.conv1d.bias, padding=k - 1, groups=di + 2 * gn)
    xs, B, C = F.silu(conv[..., :length].mT).split([di, gn, gn], -1)
    y = naive_ssd_scan(rearrange(xs, "b l (h p) -> b l h p", p=cfg.headdim), dt, -torch.exp(block.A_log),
                       rearrange(B, "b l (g n) -> b l g n", g=cfg.ngroups),
                       rearrange(C, "b l (g n) -> b l g n", g=cfg.ngroups),
                       D=block.D, dt_bias=block.dt_bias, dt_softplus=True)
    y = rearrange(y, "b l h p -> b l (h p)") * F.silu(z)
    y = rearrange(y, "b l (g c) -> b l g c", g=cfg.ngroups)
    y = rearrange(y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps), "b l g c -> b l (g c)")
    return x + F.linear(y * block.gate_norm.weight, block.out_proj.weight, block.out_proj.bias)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_dense_block_equals_the_ssd_recurrence(gen, ngroups):
    block = build("dense", gen, ngroups=ngroups, bias=True)
    x, modality = inputs(gen)
    torch.testing.assert_close(block(x, modality), reference_mixer(block, x), rtol=1e-12, atol=1e-12)


def test_float32_state_of_a_bfloat16_block():
    block = momkit.build_block(block_spec("mom")).to(torch.bfloat16)
    state = block.allocate_state(3)
    assert state.ssm.dtype == torch.float32 and state.conv.dtype == torch.bfloat16


@pytest.mark.parametrize("options,message", [
    ({"headdim": 12}, r"headdim \(12\) must divide d_inner = expand \* d_model = 32; "
                      r"valid headdims: 1, 2, 4, 8, 16, 32"),
    ({"ngroups": 3}, r"ngroups \(3\) must divide nheads = d_inner / headdim = 4; valid ngroups: 1, 2, 4"),
    ({"dt_min": 0.5}, r"dt_min \(0.5\) must not exceed dt_max \(0.1\)"),
    ({"chunk_size": 0}, r"chunk_size\n  Input should be greater than 0"),
    ({"d_sate": 8}, r"unknown field\(s\) 'd_sate' for Mamba2Config; valid fields: .*d_state"),
])
def test_bad_options_are_clear_validation_errors(options, message):
    with pytest.raises(ValidationError, match=message):
        momkit.build_block(block_spec("mom", **options))


def test_block_from_a_dict_spec(gen):
    block = momkit.build_block({"modalities": ["text", "image"],
                                "backbone": {"kind": "mamba2", "d_model": 32, "d_state": 8, "headdim": 16,
                                             "chunk_size": 8},
                                "routing": {"specific": "mom"}, "scan_backend": "reference"})
    assert block.routed == frozenset({"in_proj", "out_proj"})
    assert block.in_proj.weight.shape == (2, 2 * 64 + 2 * 8 + 4, 32)
    x = torch.randn(1, 20, 32, generator=gen)
    assert block(x, torch.randint(0, 2, (1, 20), generator=gen)).shape == x.shape


def test_flops_count_the_matmuls_and_the_chunked_scan():
    registry = momkit.get_registry()
    config = registry.get("backbone", "mamba2").config.model_validate(block_spec("mom")["backbone"])
    flops = registry.get("backbone", "mamba2").flops
    d, di, h, n = 16, 32, 4, 4
    parts = flops(config, 64)
    assert parts["in_proj"] == 2 * d * (2 * di + 2 * n + h) and parts["out_proj"] == 2 * di * d
    assert parts["conv1d"] == 2 * (di + 2 * n) * 4
    assert flops(config, 4)["scan"] < flops(config, 8)["scan"] == parts["scan"]
    assert parts.keys() - set(ALL) == {"scan"}


def test_accounting_of_a_mamba2_model():
    spec = docs_spec()
    accounting = momkit.account(spec, seq_len=256)
    assert accounting.total == count(momkit.build_model(spec))
    assert {s.name for s in accounting.sublayers if s.routed} == {"in_proj", "out_proj"}

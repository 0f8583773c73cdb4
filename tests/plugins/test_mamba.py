"""The Mamba-1 block: MoM and dense from one spec, and its initialisation (the block contract it shares with the
other backbones is in test_block_contract.py)."""

from pathlib import Path

import torch
import yaml

import momkit
from momkit.spec import ModelSpec

EXAMPLE = Path(__file__).parents[2] / "examples" / "mamba_mom.yaml"


def block_spec(specific):
    return {"modalities": ["text", "image"], "routing": {"specific": specific}, "scan_backend": "reference",
            "backbone": {"kind": "mamba", "d_model": 16, "d_state": 4, "expand": 2, "dt_rank": 3}}


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_mom_and_dense_from_one_yaml_differ_by_one_copy_of_the_projections():
    text = EXAMPLE.read_text()
    assert "specific: mom" in text
    mom = momkit.build_block(ModelSpec.model_validate(yaml.safe_load(text)))
    dense = momkit.build_block(ModelSpec.model_validate(yaml.safe_load(text.replace("specific: mom",
                                                                                     "specific: dense"))))
    projections = sum(count(getattr(dense, name)) for name in ("in_proj", "x_proj", "dt_proj", "out_proj"))
    assert count(mom) == count(dense) + projections
    assert mom.in_proj.weight.shape == (2, *dense.in_proj.weight.shape)
    assert mom.conv1d.weight.shape == dense.conv1d.weight.shape
    assert mom.A_log.shape == dense.A_log.shape


def test_mamba_initialisation():
    block = momkit.build_block(block_spec("mom"))
    cfg = block.config
    torch.testing.assert_close(block.A_log[0], torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)))
    dt = torch.nn.functional.softplus(block.dt_proj.bias)
    assert dt.min() >= cfg.dt_init_floor * 0.999 and dt.max() <= cfg.dt_max * 1.001
    assert torch.equal(block.D, torch.ones_like(block.D))

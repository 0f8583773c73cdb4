"""Parameter and FLOP accounting against the built model."""

import momkit
from momkit import account, build_model
from momkit.spec import ModelSpec


def spec(routing):
    return ModelSpec.model_validate({
        "name": "acc", "modalities": ["text", "image", "speech"], "routing": {"specific": routing},
        "backbone": {"kind": "mamba", "d_model": 32, "n_layers": 3, "d_state": 8}})


def test_totals_match_the_built_model():
    for routing in ("dense", "mom", "all"):
        model = build_model(spec(routing))
        assert account(spec(routing)).total == sum(p.numel() for p in model.parameters())


def test_active_per_token_equals_dense_and_total_grows_by_routed_copies():
    dense, mom = account(spec("dense")), account(spec("mom"))
    assert mom.active == dense.active
    routed = {s.name: s.total for s in dense.sublayers if s.name in ("in_proj", "x_proj", "dt_proj", "out_proj")}
    assert mom.total - dense.total == 2 * sum(routed.values())
    assert mom.training_flops == dense.training_flops


def test_training_flops_are_three_forward_matmuls():
    acc = account(spec("mom"))
    d, di = 32, 64
    assert acc.training_flops["text"]["in_proj"] == 3 * 3 * 2 * d * 2 * di
    assert acc.training_flops["text"]["head"] == 3 * 2 * d * 256
    assert acc.training_flops["image"]["head"] == 3 * 2 * d * 1024
    assert momkit.get_registry().backbones["mamba"].flops(spec("mom").backbone, 1)["out_proj"] == 2 * di * d

"""Layer stacks: a pattern of layers, each its own backbone and routing, repeated to the model's depth."""

import pytest
import torch
import yaml

from momkit import Batch, build_model
from momkit.ablate import SuiteSpec, variant_specs
from momkit.accounting import account
from momkit.cli import main
from momkit.spec import ModelSpec

BASE = {"name": "stack", "modalities": ["text", "image"], "routing": {"specific": "mom"},
        "backbone": {"kind": "mamba", "d_model": 16, "n_layers": 4, "d_state": 4}}
FFN = {"backbone": {"kind": "ffn", "ffn_mult": 2}, "routing": {"specific": ["w1", "w3"]}}
ATTENTION = {"backbone": {"kind": "attention", "n_heads": 2}, "routing": {"specific": "mot"}}


def spec(**changes):
    return ModelSpec.model_validate({**BASE, **changes})


def batch(gen, length=24):
    modality = (torch.arange(length) // 6 % 2).repeat(2, 1)
    return Batch(modality=modality, tokens=torch.randint(0, 200, (2, length), generator=gen))


def test_a_one_entry_pattern_is_the_homogeneous_model(gen):
    torch.manual_seed(0)
    plain = build_model(spec())
    torch.manual_seed(0)
    stacked = build_model(spec(layers=[{}]))
    x = batch(gen)
    assert plain.state_dict().keys() == stacked.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), stacked.state_dict().values()))
    torch.testing.assert_close(stacked(x).hidden, plain(x).hidden, rtol=0, atol=0)
    assert account(spec(layers=[{}]), 64) == account(spec(), 64)


def test_pattern_repeats_to_the_depth_with_each_entrys_backbone_and_routing():
    model = build_model(spec(layers=[{}, FFN]))
    assert [type(b).__name__ for b in model.blocks] == ["MambaBlock", "FFNBlock"] * 2
    assert [sorted(b.routed) for b in model.blocks[:2]] == [["dt_proj", "in_proj", "out_proj", "x_proj"],
                                                            ["w1", "w3"]]
    assert model.blocks[1].w1.weight.shape == (2, 32, 16) and model.blocks[1].w2.weight.shape == (16, 32)


def test_routing_only_the_first_layers():
    dense = {"routing": {"specific": "dense"}}
    model = build_model(spec(layers=[{}, {}, dense, dense]))
    assert [bool(b.routed) for b in model.blocks] == [True, True, False, False]
    rows = {s.name: s.routing for s in account(spec(layers=[{}, {}, dense, dense]), 64).sublayers}
    assert rows["in_proj"] == "routed in 2 of 4 layers" and rows["conv1d"] == "shared"


def test_a_hybrid_stack_trains_and_decodes_as_it_runs_whole(gen):
    torch.manual_seed(0)
    model = build_model(spec(layers=[{}, {}, {}, ATTENTION])).double()
    x = batch(gen)
    out = model(x)
    loss = sum(torch.nn.functional.cross_entropy(out.predictions[m], x.tokens[out.targets[m]]) for m in ("text",
                                                                                                           "image"))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    state = model.allocate_state(2, x.modality.shape[1])
    with torch.no_grad():
        steps = torch.stack([model.step(x.tokens[:, t], x.modality[:, t], state) for t in range(x.modality.shape[1])],
                            dim=1)
    torch.testing.assert_close(steps, out.hidden.detach(), rtol=1e-10, atol=1e-10)


def test_accounting_names_each_backbones_sublayers_and_sums_every_layer():
    stacked = spec(layers=[{}, FFN])
    acc = account(stacked, 64)
    names = [s.name for s in acc.sublayers]
    assert names[:2] == ["mamba.norm", "mamba.in_proj"] and "ffn.w1" in names and names[-1] == "final_norm"
    model = build_model(stacked)
    blocks = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.final_norm.parameters())
    assert sum(s.total for s in acc.sublayers) == blocks
    mamba_only = account(spec(backbone={**BASE["backbone"], "n_layers": 2}), 64).training_flops["text"]
    assert acc.training_flops["text"]["mamba.in_proj"] == mamba_only["in_proj"]
    assert acc.training_flops["text"]["ffn.w1"] == 3 * 2 * (2.0 * 16 * 32)


@pytest.mark.parametrize("layers,message", [
    ([{}, FFN, {}], r"backbone.n_layers \(4\) must be a multiple of the 3 entries of layers; valid n_layers: 3, 6"),
    ([{}, {"backbone": {"kind": "ffn", "ffn_mult": -1}, "routing": {"specific": "dense"}}],
     r"layers.1: backbone.ffn_mult: Input should be greater than 0"),
    ([{"backbone": {"kind": "mambo"}}], r"layers.0: backbone: .*unknown backbone 'mambo'; registered: .*mamba"),
    ([{}, {"backbone": {"kind": "ffn"}}], r"layers.1: routing: .*preset 'mom' is not defined for backbone 'ffn'"),
    ([{"backbone": {"kind": "mamba", "d_model": 8}}], r"layers.0.backbone.d_model: the layers share the model's"),
    ([{"routing": {"specific": ["final_norm"]}}], r"layers.0: routing: .*'final_norm', not a sublayer"),
    ([], "layers is an empty pattern"),
])
def test_a_bad_entry_is_named_with_its_field(layers, message):
    with pytest.raises(ValueError, match=message):
        spec(layers=layers)


def test_validate_names_the_bad_entry_without_traceback(tmp_path, capsys):
    path = tmp_path / "stack.yaml"
    path.write_text("name: s\nmodalities: [text]\nbackbone: {kind: mamba, d_model: 16, n_layers: 2}\n"
                    "layers: [{}, {backbone: {kind: ffn, expand: 2}, routing: {specific: dense}}]\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "layers.1: backbone: " in err and "unknown field(s) 'expand' for FFNConfig" in err
    assert "Traceback" not in err


def test_a_suite_overrides_a_field_of_one_pattern_entry():
    suite = SuiteSpec.model_validate({"name": "s", "base": {}, "baseline": "dense-ffn", "variants": {
        "dense-ffn": {"layers.1.routing.specific": "dense"}, "routed-ffn": {"layers.1.routing.specific": "all"}}})
    specs = variant_specs(suite, {**BASE, "layers": [{}, FFN]})
    assert specs["dense-ffn"][0].layers[1].routing.specific == "dense"
    assert specs["routed-ffn"][0].blocks()[1].routed == {"norm", "w1", "w2", "w3"}
    bad = SuiteSpec.model_validate({"name": "s", "base": {}, "baseline": "x", "variants": {
        "x": {"layers.2.routing.specific": "dense"}}})
    with pytest.raises(ValueError, match=r"'layers.2.routing.specific': layers is a list of 2 entries; "
                                         r"valid indices: 0, 1"):
        variant_specs(bad, {**BASE, "layers": [{}, FFN]})


def test_info_and_train_on_a_stacked_spec_file(tmp_path, capsys):
    path = tmp_path / "stack.yaml"
    path.write_text("name: stack\nmodalities: [text, image]\n"
                    "backbone: {kind: mamba, d_model: 16, n_layers: 2, d_state: 4}\nrouting: {specific: mom}\n"
                    "layers: [{}, {backbone: {kind: ffn}, routing: {specific: [w1, w3]}}]\ndata: {kind: synthetic}\n"
                    "train: {steps: 20, batch_size: 2, seq_len: 32, eval_every: 10, eval_batches: 1}\n")
    assert main(["info", str(path), "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "pattern [mamba (routed: dt_proj, in_proj, out_proj, x_proj), ffn (routed: w1, w3)] x 1" in out
    assert "| ffn.w1 " in out and "| mamba.in_proj " in out
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--max-steps", "2", "--quiet"]) == 0
    assert "step 2, held-out loss text " in capsys.readouterr().out


def test_a_stacked_spec_survives_the_run_directorys_yaml():
    stacked = spec(layers=[{}, ATTENTION])
    again = ModelSpec.model_validate(yaml.safe_load(stacked.to_yaml()))
    assert again == stacked and [b.backbone.kind for b in again.blocks()] == ["mamba", "attention"] * 2

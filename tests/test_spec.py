"""Specs: valid ones build, invalid ones name the bad field and what would be valid."""

import pytest
import yaml
from pydantic import ValidationError

import momkit
from momkit.spec import BlockSpec, ModelSpec, load_spec

ISSUE_EXAMPLE = {
    "modalities": ["text", "image"],
    "backbone": {"kind": "mamba", "d_model": 32, "d_state": 8, "expand": 2},
    "routing": {"specific": ["in_proj", "x_proj", "dt_proj", "out_proj"]},
    "scan_backend": "reference",
}


def with_changes(**changes):
    spec = {**ISSUE_EXAMPLE, "backbone": dict(ISSUE_EXAMPLE["backbone"])}
    for key, value in changes.items():
        if key.startswith("backbone_"):
            spec["backbone"][key[len("backbone_"):]] = value
        else:
            spec[key] = value
    return spec


def test_issue_example_is_a_valid_block_spec():
    spec = BlockSpec.model_validate(ISSUE_EXAMPLE)
    assert spec.routed == {"in_proj", "x_proj", "dt_proj", "out_proj"}
    assert spec.backbone.d_state == 8 and spec.backbone.d_conv == 4
    assert BlockSpec.model_validate(spec.model_dump()) == spec


@pytest.mark.parametrize("preset,routed", [
    ("dense", set()),
    ("mom", {"in_proj", "x_proj", "dt_proj", "out_proj"}),
    ("all", {"norm", "in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj"}),
])
def test_presets(preset, routed):
    assert BlockSpec.model_validate(with_changes(routing={"specific": preset})).routed == routed


@pytest.mark.parametrize("spec,field,message", [
    (with_changes(backbone_kind="mamab"), "backbone", "unknown backbone 'mamab'; registered: .*mamba"),
    (with_changes(backbone_d_stat=8), "backbone", "'d_stat'.*valid fields: .*d_state"),
    (with_changes(backbone_d_state=0), "backbone.d_state", "greater than 0"),
    (with_changes(modalities=["text", "imgae"]), "modalities", "unknown modality 'imgae'; registered: .*image"),
    (with_changes(modalities=["text", "text"]), "modalities", "'text' more than once; give repeated kinds"),
    (with_changes(modalities=["text", {"kind": "image", "vocab_size": 8, "latent_dim": 4}]), "modalities",
     "exactly one of vocab_size .* and latent_dim"),
    (with_changes(modalities=["text", {"name": "image_vq"}]), "modalities", "mapping with a `kind`, one of"),
    (with_changes(modalities=["text", {"kind": "image", "vocab": 8}]), "modalities.1",
     "'vocab'.*valid fields: kind, name, vocab_size, latent_dim"),
    (with_changes(modalities=[]), "modalities", "at least 1"),
    (with_changes(routing={"specific": ["in_proj", "conv"]}), "routing",
     "'conv', not a sublayer of backbone 'mamba'; its sublayers: norm, in_proj, conv1d"),
    (with_changes(routing={"specific": "mot"}), "routing", "preset 'mot' is not defined for backbone 'mamba'"),
    (with_changes(routing={"specific": "moe"}), "routing", "preset 'moe' is not defined for backbone 'mamba'; "
                                                           "its presets: all, dense, mom"),
    (with_changes(scan_backend="cuda-fast"), "scan_backend", "unknown scan backend 'cuda-fast'; registered: "),
    (with_changes(backbone_n_layers=4), "backbone", "n_layers belongs to a model spec"),
    (with_changes(extra_field=1), "", "unknown field.*'extra_field'.*valid fields: modalities, backbone"),
])
def test_invalid_block_specs_name_the_field(spec, field, message):
    with pytest.raises(ValidationError) as info:
        BlockSpec.model_validate(spec)
    errors = info.value.errors()
    assert any(".".join(map(str, e["loc"])).startswith(field) for e in errors), errors
    assert any(__import__("re").search(message, e["msg"]) for e in errors), errors
    assert isinstance(info.value, ValueError)


def test_one_modality_kind_twice_with_different_settings():
    spec = BlockSpec.model_validate(with_changes(modalities=[
        "text", {"kind": "image", "name": "image_vq", "vocab_size": 8192},
        {"kind": "image", "name": "image_latent", "latent_dim": 16}]))
    assert spec.modality_names == ["text", "image_vq", "image_latent"]
    text, vq, latent = spec.modalities
    assert (text.discrete, text.vocab_size) == (True, 256)
    assert (vq.discrete, vq.vocab_size) == (True, 8192)
    assert (latent.discrete, latent.latent_dim, latent.vocab_size) == (False, 16, None)
    assert BlockSpec.model_validate(spec.model_dump()) == spec
    assert momkit.build_block(spec).n_modalities == 3


def test_model_spec_needs_n_layers_and_yields_its_block():
    with pytest.raises(ValidationError, match="n_layers is required"):
        ModelSpec.model_validate({**ISSUE_EXAMPLE, "name": "m"})
    spec = ModelSpec.model_validate(with_changes(name="m", backbone_n_layers=3))
    block = spec.block()
    assert isinstance(block, BlockSpec) and block.backbone.n_layers is None and block.routed == spec.routed


def test_load_spec_reads_yaml(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("modalities: [text, image]\nbackbone: {kind: mamba, d_model: 16}\nrouting: {specific: mom}\n")
    spec = load_spec(path)
    assert isinstance(spec, BlockSpec) and spec.routed == {"in_proj", "x_proj", "dt_proj", "out_proj"}
    with pytest.raises(ValueError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_spec(path)


def test_build_block_takes_dict_blockspec_and_modelspec():
    for spec in (ISSUE_EXAMPLE, BlockSpec.model_validate(ISSUE_EXAMPLE),
                 ModelSpec.model_validate(with_changes(name="m", backbone_n_layers=2))):
        block = momkit.build_block(spec)
        assert block.in_proj.weight.shape == (2, 128, 32)
        assert block.conv1d.weight.shape == (64, 4)


def test_fsdp_options_need_strategy_fsdp(tmp_path):
    base = with_changes(name="m", backbone_n_layers=2)
    spec = ModelSpec.model_validate({**base, "parallel": {"strategy": "fsdp", "reshard_after_forward": False,
                                                          "param_dtype": "bf16"}})
    assert ModelSpec.model_validate(spec.model_dump()) == spec
    ddp = ModelSpec.model_validate({**base, "parallel": {"strategy": "ddp"}})
    assert ModelSpec.model_validate(ddp.model_dump()) == ddp
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**base, "parallel": {"param_dtype": "bf16"}}))
    with pytest.raises(ValueError, match="parallel.param_dtype: bf16 applies to strategy fsdp, not 'ddp'"):
        load_spec(path)
    with pytest.raises(ValueError, match=r"parallel.param_dtype\s+String should match pattern .\^\(fp32\|bf16\)"):
        ModelSpec.model_validate({**base, "parallel": {"strategy": "fsdp", "param_dtype": "fp16"}})
    with pytest.raises(ValueError, match="param_dtype: bf16 with train.precision: fp16 would compute float16"):
        ModelSpec.model_validate({**base, "parallel": {"strategy": "fsdp", "param_dtype": "bf16"},
                                  "train": {"precision": "fp16"}})

"""Pretrained models: import from transformers and mamba_ssm checkpoints, save and load, export, upcycling,
``init_from`` and ``train.freeze``.

Reference models are tiny random ``transformers`` models saved to a temporary directory; nothing is
downloaded. mamba_ssm checkpoints are written by hand from the same weights under mamba_ssm's key names.
"""

import json

import pytest
import torch
import yaml

import momkit
from momkit import Batch, SpecError, build_model
from momkit.cli import main
from momkit.pretrained import sharing

transformers = pytest.importorskip("transformers")

VOCAB = 96
GROUPED_NORM = (5, 23)


def _needs_grouped_norm(arch: str) -> None:
    """Skip a comparison of Mamba-2 outputs with a transformers whose PyTorch path normalises over the whole inner
    width (before 5.23), where momkit, mamba_ssm and later transformers normalise each of the ``n_groups``."""
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    if arch == "mamba2" and version < GROUPED_NORM:
        pytest.skip(f"transformers {transformers.__version__} normalises Mamba-2's gated norm over the whole inner "
                    f"width (per group from 5.23), so its outputs differ with n_groups = 2")


def _perturbed(model):
    """Every weight moved off its initial value, so no test passes on constant (ones, zeros) weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _hf(arch: str, tie: bool | None = None):
    torch.manual_seed(0)
    tied = {} if tie is None else {"tie_word_embeddings": tie}
    if arch == "mamba":
        config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                          **tied)
        return _perturbed(transformers.MambaForCausalLM(config))
    if arch == "mamba2":
        config = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                           num_heads=8, head_dim=8, n_groups=2, chunk_size=8, **tied)
        return _perturbed(transformers.Mamba2ForCausalLM(config))
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                                      rms_norm_eps=1e-6, **tied)
    return _perturbed(transformers.LlamaForCausalLM(config))


def _tokens(seed: int = 1, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: momkit.Model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(Batch(modality=torch.zeros_like(tokens), tokens=tokens))
    return model.heads[model.spec.modality_names[0]](out.hidden)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


ARCHS = [("mamba", None), ("mamba", False), ("mamba2", None), ("mamba2", True), ("llama", None), ("llama", True)]


@pytest.fixture(params=ARCHS, ids=lambda a: f"{a[0]}-tie{a[1]}")
def hf_dir(request, tmp_path):
    arch, tie = request.param
    model = _hf(arch, tie)
    model.save_pretrained(tmp_path / "hf")
    return arch, model, tmp_path / "hf"


def test_import_equals_transformers(hf_dir):
    arch, hf, path = hf_dir
    _needs_grouped_norm(arch)
    model = momkit.load(path)
    spec = model.spec
    assert spec.backbone.kind == {"llama": "transformer"}.get(arch, arch)
    assert spec.modality_names == ["text"] and spec.modalities[0].vocab_size == VOCAB
    assert spec.modalities[0].tie_embeddings == hf.config.tie_word_embeddings
    if arch == "llama":
        assert (spec.backbone.rope_theta, spec.backbone.n_kv_heads, spec.backbone.ffn_hidden) == (500.0, 2, 40)
    tokens = _tokens()
    with torch.no_grad():
        reference = hf(tokens).logits
    assert _rel(_logits(model, tokens), reference) < 1e-4


def test_save_load_round_trip_is_exact(hf_dir, tmp_path):
    model = momkit.load(hf_dir[2])
    for shard in (None, 4096):
        out = tmp_path / f"saved{shard}"
        model.save(out) if shard is None else model.save(out, max_shard_bytes=shard)
        assert (out / ("model.safetensors" if shard is None else "model.safetensors.index.json")).is_file()
        again = momkit.load(out)
        assert again.spec == model.spec
        mine, theirs = dict(model.named_parameters()), dict(again.named_parameters())
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        tokens = _tokens(2)
        assert torch.equal(_logits(again, tokens), _logits(model, tokens))


def test_export_reloads_in_transformers(hf_dir, tmp_path):
    _, hf, path = hf_dir
    momkit.export(momkit.load(path), tmp_path / "exported")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    tokens = _tokens(3)
    with torch.no_grad():
        assert _rel(again(tokens).logits, hf(tokens).logits) < 1e-6


def test_greedy_generate_equals_transformers(hf_dir):
    arch, hf, path = hf_dir
    _needs_grouped_norm(arch)
    model = momkit.load(path)
    prompt = _tokens(4, length=6)
    mine = model.generate(Batch(modality=torch.zeros_like(prompt), tokens=prompt), 20, temperature=0)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert theirs.shape == (2, 26)
    assert torch.equal(mine.tokens, theirs)


def _mamba_ssm_dir(path, hf, layer: str):
    """A mamba_ssm MambaLMHeadModel directory: its config.json and a pickled state dict under its key names
    (``backbone.embedding``, and ``lm_head.weight`` stored although tied)."""
    path.mkdir()
    c = hf.config
    ssm_cfg = {"layer": layer, "d_state": c.state_size}
    if layer == "Mamba2":
        ssm_cfg.update(headdim=c.head_dim, ngroups=c.n_groups, chunk_size=c.chunk_size)
    config = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": VOCAB,
              "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    (path / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, path / "pytorch_model.bin")


@pytest.mark.parametrize("arch,layer", [("mamba", "Mamba1"), ("mamba2", "Mamba2")])
def test_import_mamba_ssm_layout(arch, layer, tmp_path):
    _needs_grouped_norm(arch)
    hf = _hf(arch, tie=True)
    _mamba_ssm_dir(tmp_path / "ssm", hf, layer)
    model = momkit.load(tmp_path / "ssm")
    assert model.spec.backbone.kind == arch and model.spec.modalities[0].tie_embeddings
    tokens = _tokens(5)
    with torch.no_grad():
        assert _rel(_logits(model, tokens), hf(tokens).logits) < 1e-4


class Payload:
    """An object a pickled checkpoint might smuggle in."""


def test_pickled_checkpoint_is_read_as_data_only(tmp_path):
    hf = _hf("mamba", tie=True)
    _mamba_ssm_dir(tmp_path / "ssm", hf, "Mamba1")
    torch.save({"backbone.embedding.weight": Payload()}, tmp_path / "ssm" / "pytorch_model.bin")
    with pytest.raises(SpecError, match="weights_only=True"):
        momkit.load(tmp_path / "ssm")


def test_safetensors_files_match_the_reference_library(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from momkit.weights import read_safetensors, write_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randint(-9, 9, (2, 2)),
               "d": torch.randn(4, 1, 2).to(torch.float16), "e": torch.rand(3) > 0.5}
    write_safetensors(tmp_path / "mine.safetensors", tensors)
    theirs = safetensors_torch.load_file(tmp_path / "mine.safetensors")
    safetensors_torch.save_file(tensors, tmp_path / "theirs.safetensors")
    mine = read_safetensors(tmp_path / "theirs.safetensors")
    for read in (theirs, mine):
        assert read.keys() == tensors.keys()
        assert all(read[k].dtype == t.dtype and torch.equal(read[k], t) for k, t in tensors.items())


def _routed_spec(source: momkit.Model, **changes) -> dict:
    spec = source.spec.model_dump(mode="json")
    spec.update(name="upcycled", routing={"specific": "all"},
                modalities=[*spec["modalities"], {"kind": "image", "vocab_size": 64}])
    for key, value in changes.items():
        section, _, field = key.partition(".")
        spec[section][field] = value
    return spec


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "llama"])
def test_upcycled_copies_equal_the_dense_weights(arch, tmp_path):
    _hf(arch).save_pretrained(tmp_path / "hf")
    dense = momkit.load(tmp_path / "hf")
    routed = momkit.load(tmp_path / "hf", spec=_routed_spec(dense))
    roles, weights = sharing(routed), dict(dense.named_parameters())
    assert "routed" in roles.values()
    for name, param in routed.named_parameters():
        if roles[name] == "routed":
            assert param.shape == (2, *weights[name].shape)
            assert all(torch.equal(copy, weights[name]) for copy in param)
        elif name in weights:
            assert torch.equal(param, weights[name])
    tokens = _tokens(6)
    assert _rel(_logits(routed, tokens), _logits(dense, tokens)) < 1e-6


def test_upcycling_a_mismatched_spec_names_the_field(tmp_path):
    _hf("mamba").save_pretrained(tmp_path / "hf")
    dense = momkit.load(tmp_path / "hf")
    with pytest.raises(SpecError, match="backbone.d_model is 64 in the spec, 32 in the source"):
        momkit.load(dense, spec=_routed_spec(dense, **{"backbone.d_model": 64}))
    with pytest.raises(SpecError, match="backbone.d_state is 4 in the spec, 8 in the source"):
        momkit.load(dense, spec=_routed_spec(dense, **{"backbone.d_state": 4}))
    with pytest.raises(SpecError, match="backbone.n_layers is 3 in the spec, 2 in the source"):
        momkit.load(dense, spec=_routed_spec(dense, **{"backbone.n_layers": 3}))
    spec = _routed_spec(dense)
    spec["modalities"][0]["vocab_size"] = 50
    with pytest.raises(SpecError, match="modalities.0.vocab_size is 50 in the spec, 96 in the source"):
        momkit.load(dense, spec=spec)
    untied = _hf("llama", tie=False)
    untied.save_pretrained(tmp_path / "untied")
    spec = _routed_spec(momkit.load(tmp_path / "untied"))
    spec["modalities"][0]["tie_embeddings"] = True
    with pytest.raises(SpecError, match="modalities.0.tie_embeddings is true in the spec, false in the source"):
        momkit.load(tmp_path / "untied", spec=spec)


def test_unsupported_checkpoint_options_are_refused(tmp_path):
    model = _hf("llama")
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(SpecError, match="attention_bias = True is not supported"):
        momkit.load(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(SpecError, match="model type 'gpt2'"):
        momkit.load(tmp_path / "hf")


def test_hub_id_is_downloaded_with_huggingface_hub(tmp_path, monkeypatch):
    _hf("mamba").save_pretrained(tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub",
                        __import__("types").SimpleNamespace(snapshot_download=snapshot_download))
    model = momkit.load("some-owner/mamba-tiny")
    assert calls[0][0] == "some-owner/mamba-tiny" and "*.safetensors" in calls[0][1]
    assert model.spec.name == "mamba-tiny" and model.spec.backbone.kind == "mamba"


def test_missing_source_and_missing_hub_library(tmp_path, monkeypatch):
    with pytest.raises(SpecError, match="does not exist"):
        momkit.load(tmp_path / "nowhere")
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(SpecError, match=r"pip install 'momkit\[hub\]'"):
        momkit.load("some-owner/some-model")


TRAIN = {"steps": 5, "batch_size": 2, "seq_len": 32, "eval_every": 5, "checkpoint_every": 5, "eval_batches": 1,
         "warmup_steps": 1}


def _dense_text(tmp_path) -> str:
    spec = {"name": "dense-text", "modalities": [{"kind": "text"}],
            "backbone": {"kind": "mamba", "d_model": 32, "n_layers": 2, "d_state": 8}, "train": TRAIN}
    path = tmp_path / "dense.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["train", str(path), "--out", str(tmp_path / "dense"), "--quiet"]) == 0
    return str(tmp_path / "dense" / "model")


def test_train_from_init_with_shared_frozen(tmp_path, capsys):
    source = _dense_text(tmp_path)
    spec = {"name": "mom", "modalities": ["text", "image"], "routing": {"specific": "mom"},
            "backbone": {"kind": "mamba", "d_model": 32, "n_layers": 2, "d_state": 8}, "init_from": source,
            "train": {**TRAIN, "freeze": ["shared"]}}
    path = tmp_path / "mom.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["train", str(path), "--out", str(tmp_path / "mom"), "--quiet"]) == 0
    before, after = momkit.load(source), momkit.load(tmp_path / "mom" / "model")
    start = momkit.load(before, spec=after.spec)
    roles, initial, trained = sharing(after), dict(start.named_parameters()), dict(after.named_parameters())
    assert {r for r in roles.values()} == {"shared", "routed", "modality"}
    for name, role in roles.items():
        assert torch.equal(initial[name], trained[name]) == (role == "shared"), name
    assert main(["info", str(tmp_path / "mom" / "model")]) == 0
    assert "active per image token" in capsys.readouterr().out


def test_cli_import_export_and_refusals(tmp_path, capsys):
    _needs_grouped_norm("mamba2")
    _hf("mamba2").save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    assert main(["export", str(tmp_path / "imported"), "--to", "transformers", "--out", str(tmp_path / "back")]) == 0
    tokens = _tokens(7)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert _rel(reloaded(tokens).logits, _logits(momkit.load(tmp_path / "imported"), tokens)) < 1e-6
    spec = _routed_spec(momkit.load(tmp_path / "imported"))
    spec["routing"] = {"specific": "mom"}
    (tmp_path / "routed.yaml").write_text(yaml.safe_dump(spec))
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "routed"),
                 "--spec", str(tmp_path / "routed.yaml")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "routed"), "--out", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "routes in_proj, out_proj" in err
    assert main(["import", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    s4 = build_model({"name": "s4", "modalities": ["text"],
                      "backbone": {"kind": "mamba", "d_model": 16, "n_layers": 1, "selective": ["dt"]}})
    with pytest.raises(ValueError, match=r"makes B, C fixed in time .* valid selective \[dt, B, C\]"):
        momkit.export(s4, tmp_path / "s4")


def test_suite_variant_starts_from_another_variants_model(tmp_path, capsys):
    base = {"name": "base", "modalities": ["text", "image"], "routing": {"specific": "mom"},
            "backbone": {"kind": "mamba", "d_model": 32, "n_layers": 2, "d_state": 8}, "train": TRAIN}
    suite = {"name": "up", "base": base, "baseline": "scratch", "seeds": [0],
             "variants": {"upcycled": {"init_from": "variant:text", "train.freeze": ["shared"]},
                          "text": {"modalities": ["text"], "routing.specific": "dense"}, "scratch": {}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    assert main(["ablate", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "out")]) == 0
    runs = tmp_path / "out" / "runs"
    stored = yaml.safe_load((runs / "upcycled" / "seed0" / "spec.yaml").read_text())
    assert stored["init_from"] == str((runs / "text" / "seed0" / "model").resolve())
    text = momkit.load(runs / "text" / "seed0" / "model")
    upcycled = momkit.load(runs / "upcycled" / "seed0" / "model")
    assert torch.equal(upcycled.blocks[0].conv1d.weight, text.blocks[0].conv1d.weight)
    assert "| image | upcycled |" in capsys.readouterr().out
    for variants, message in (({"a": {"init_from": "variant:b"}}, "names no variant"),
                              ({"a": {"init_from": "variant:b"}, "b": {"init_from": "variant:a"}},
                               "cycle: a -> b -> a")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**suite, "variants": variants, "baseline": "a"}))
        assert main(["ablate", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err

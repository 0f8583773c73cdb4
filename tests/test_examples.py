"""Every shipped example spec validates, builds, trains one step on CPU and generates."""

import sysconfig
from pathlib import Path

import pytest
import torch

from momkit import Batch, build_model, load_spec
from momkit.cli import main

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def test_every_backbone_has_dense_and_routed_examples():
    names = {p.stem for p in EXAMPLES}
    assert {"mamba_dense", "mamba_mom", "mamba2_dense", "mamba2_mom", "transformer_dense",
            "transformer_mot"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_builds_trains_and_generates(path, capsys):
    assert main(["validate", str(path)]) == 0
    spec = load_spec(path)
    torch.manual_seed(0)
    model = build_model(spec)
    g = torch.Generator().manual_seed(0)
    batch, length = 2, 40
    modality = (torch.arange(length) // 10 % len(spec.modalities)).repeat(batch, 1)
    tokens = torch.randint(0, 200, (batch, length), generator=g)
    out = model(Batch(modality=modality, tokens=tokens))
    loss = sum(torch.nn.functional.cross_entropy(out.predictions[m.name], tokens[out.targets[m.name]])
               for m in spec.modalities)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    generated = model.generate(Batch(modality=modality[:, :5], tokens=tokens[:, :5]), 4, temperature=0)
    assert generated.tokens.shape == (batch, 9)
    assert torch.equal(generated.tokens[:, :5], tokens[:, :5])


SUITES = sorted((Path(__file__).parents[1] / "examples" / "suites").glob("*.yaml"))


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_shipped_suite_validates(path):
    from momkit.ablate import load_suite, variant_specs

    suite, base = load_suite(path)
    specs = variant_specs(suite, base)
    assert suite.baseline in specs and all(len(by_seed) == len(suite.seeds) for by_seed in specs.values())


def test_the_selectivity_suite_runs(tmp_path, capsys):
    suite = Path(__file__).parents[1] / "examples" / "suites" / "selectivity.yaml"
    tiny = ["train.batch_size=2", "train.seq_len=64", "train.eval_every=1", "train.eval_batches=1",
            "backbone.d_model=16", "backbone.d_state=4", "data.codebook_documents=64",
            f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["ablate", str(suite), *tiny, "--out", str(tmp_path / "out"), "--max-steps", "2",
                 "--device", "cpu"]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    for modality in ("text", "image", "speech"):
        for variant in ("selective", "dt_only", "BC_only", "none", "none_lin"):
            assert f"| {modality} | {variant}" in summary


def test_the_bytes_vs_bpe_suite_runs(tmp_path, monkeypatch):
    """The documented recipe on a few files of the standard library: two conversions, then the suite, which
    compares the two tokenizations in bits per byte."""
    pytest.importorskip("tokenizers")
    examples = Path(__file__).parents[1] / "examples"
    stdlib = sysconfig.get_paths()["stdlib"]
    monkeypatch.chdir(tmp_path)
    for name, out in (("text_bytes", "data/text-bytes"), ("text_bpe", "data/text-bpe")):
        assert main(["convert", str(examples / f"{name}.yaml"), stdlib, out, "--source", "text",
                     "--glob", "a*.py"]) == 0
    tiny = ["train.batch_size=2", "train.seq_len=64", "train.eval_every=2", "train.eval_batches=2",
            "backbone.d_model=16", "backbone.d_state=4"]
    assert main(["ablate", str(examples / "suites" / "bytes_vs_bpe.yaml"), *tiny, "--out", "out", "--max-steps",
                 "2", "--device", "cpu"]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    bits = summary[summary.index("## Bits per byte"):]
    assert "| text | bytes" in bits and "| text | bpe" in bits
    assert (tmp_path / "out" / "plots" / "bpb_vs_flops_text.png").is_file()

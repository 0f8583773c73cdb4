"""The command line as a user runs it: exit status, one-line summaries, errors without tracebacks."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from momkit import SpecError, hookimpl, load_spec
from momkit.cli import main
from momkit.descriptors import Dataset
from momkit.registry import Registry, use_registry
from momkit.spec import DatasetConfig

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
SUITES = sorted((Path(__file__).parents[1] / "examples" / "suites").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_validate_accepts_shipped_examples(path, capsys):
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.strip()
    count = "parameters in the blocks" if load_spec(path).stacked else "parameters per block"
    assert len(out.splitlines()) == 1 and "valid model spec" in out and count in out


@pytest.mark.slow
@pytest.mark.integration
def test_validate_rejects_broken_spec_without_traceback(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nmodalities: [text, image]\n"
                    "backbone: {kind: mamba, d_model: 64, n_layers: 2, d_state: -4}\n"
                    "routing: {specific: [in_proj, q_proj]}\n")
    result = subprocess.run([sys.executable, "-m", "momkit", "validate", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "backbone.d_state: Input should be greater than 0" in result.stderr
    assert "invalid spec" in result.stderr


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("name: [unclosed\n", "not valid YAML"),
    ("name: x\nmodalities: [text]\nbackbone: {kind: mamba, d_model: 8, n_layers: 1}\nrouting: {specific: mot}\n",
     "routing: .*preset 'mot' is not defined"),
])
def test_user_errors_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "spec.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["validate", str(path)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.integration
def test_console_script_and_plugins_listing():
    script = Path(sys.executable).parent / "momkit"
    result = subprocess.run([str(script), "plugins"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert ["backbone", "mamba", "momkit"] in [row[:3] for row in rows]
    assert ["scan_backend", "reference", "momkit"] in [row[:3] for row in rows]
    assert ["modality", "image", "momkit"] in [row[:3] for row in rows]


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "x.yaml", "--max-steps", "0"])
    assert info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


TINY = ("name: tiny\nmodalities: [text, image]\nbackbone: {kind: mamba, d_model: 16, n_layers: 1, d_state: 4}\n"
        "routing: {specific: mom}\ndata: {kind: %s}\n"
        "train: {steps: 20, batch_size: 2, seq_len: 32, eval_every: 10, eval_batches: 1}\n")


def test_train_stopped_before_its_first_evaluation_reports_a_held_out_loss(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY % "synthetic")
    assert main(["train", str(spec), "--out", str(tmp_path / "run"), "--max-steps", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "step 3, held-out loss text " in out and "not evaluated" not in out


def failing_dataset(error):
    """A registry whose ``broken`` dataset raises ``error`` when built."""
    def build(config, modalities, split, seq_len):
        raise error

    plugin = types.ModuleType("broken_dataset")
    plugin.momkit_datasets = hookimpl(lambda: [Dataset(name="broken", description="raises", config=DatasetConfig,
                                                       build=build)])
    registry = Registry.from_entry_points()
    registry.register(plugin, distribution="tests")
    return registry


def test_a_plugins_user_error_is_one_line_and_its_bug_a_traceback(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY % "broken")
    with use_registry(failing_dataset(SpecError("the shards in /data are missing; convert them first"))):
        assert main(["train", str(spec), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "the shards in /data are missing; convert them first"
    with use_registry(failing_dataset(ValueError("index out of range in the plugin"))):
        with pytest.raises(ValueError, match="index out of range in the plugin"):
            main(["train", str(spec), "--out", str(tmp_path / "b"), "--quiet"])


def _info_rows(path, capsys):
    assert main(["info", str(path)]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def number(text):
    return int(text.replace(",", ""))


def test_info_mom_and_dense_equal_active_parameters(capsys):
    examples = Path(__file__).parents[1] / "examples"
    mom, dense = _info_rows(examples / "mamba_mom.yaml", capsys), _info_rows(examples / "mamba_dense.yaml", capsys)
    for name in ("text", "image"):
        assert mom[f"active per {name} token"] == dense[f"active per {name} token"]
    extra = sum(number(mom[s][1]) - number(dense[s][1]) for s in ("in_proj", "x_proj", "dt_proj", "out_proj"))
    assert extra == sum(number(dense[s][1]) for s in ("in_proj", "x_proj", "dt_proj", "out_proj"))
    assert number(mom["total"][1]) - number(dense["total"][1]) == extra
    assert mom["conv1d"] == dense["conv1d"] and mom["in_proj"][0] == "routed" and dense["in_proj"][0] == "shared"


def test_info_needs_a_model_spec(tmp_path, capsys):
    path = tmp_path / "block.yaml"
    path.write_text("modalities: [text]\nbackbone: {kind: mamba, d_model: 8}\n")
    assert main(["info", str(path)]) == 2
    assert "needs a model spec" in capsys.readouterr().err


def test_convert_writes_shards_the_jsonl_dataset_reads(tmp_path, capsys):
    import json

    from momkit.registry import get_registry

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: j\nmodalities: [text]\nbackbone: {kind: mamba, d_model: 8, n_layers: 1}\n"
                    f"data: {{kind: jsonl, path: {tmp_path / 'docs.jsonl'}}}\n")
    lines = [{"segments": [{"modality": "text", "tokens": [i % 256, (i * 7) % 256, 3]}]} for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["convert", str(spec), str(tmp_path / "docs.jsonl"), str(tmp_path / "shards")]) == 0
    loaded = __import__("momkit").load_spec(spec)
    from_file = get_registry().get("dataset", "jsonl").build(loaded.data, loaded.modalities, "train", 16)
    sharded = loaded.data.model_copy(update={"path": None, "shards": str(tmp_path / "shards")})
    from_shards = get_registry().get("dataset", "jsonl").build(sharded, loaded.modalities, "train", 16)
    assert from_file.batch(0, 2).tokens.equal(from_shards.batch(0, 2).tokens)


def test_convert_refuses_a_dataset_without_converter(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: s\nmodalities: [text]\nbackbone: {kind: mamba, d_model: 8, n_layers: 1}\n")
    assert main(["convert", str(spec), "in.jsonl", str(tmp_path / "out")]) == 2
    assert "dataset 'shapes' has no converter; datasets with one: ['jsonl']" in capsys.readouterr().err


def test_train_takes_overrides_validated_like_the_file(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY % "synthetic")
    out = tmp_path / "run"
    assert main(["train", str(spec), "train.lr=0.0005", "--out", str(out), "--max-steps", "1", "backbone.d_state=2",
                 "--quiet"]) == 0
    stored = yaml.safe_load((out / "spec.yaml").read_text())
    assert stored["train"]["lr"] == 0.0005 and stored["backbone"]["d_state"] == 2
    capsys.readouterr()
    assert main(["train", str(spec), "train.lr=-1", "--out", str(tmp_path / "bad")]) == 2
    assert "train.lr: Input should be greater than 0" in capsys.readouterr().err
    assert main(["validate", str(spec), "train.lr"]) == 2
    assert "override 'train.lr' must be KEY=VALUE" in capsys.readouterr().err
    assert main(["validate", str(spec), "trian.lr=1"]) == 2
    assert "unknown field(s) 'trian' for ModelSpec; valid fields: modalities" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as stop:
        main(["info", str(spec), "--seq-len", "64", "--seq_len", "64"])
    assert stop.value.code == 2 and "unrecognized arguments: --seq_len 64" in capsys.readouterr().err


def test_ablate_overrides_apply_to_every_variant(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY % "synthetic")
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\nbase: tiny.yaml\nbaseline: dense\nvariants:\n  dense: {routing.specific: dense}\n"
                     "  mom: {routing.specific: mom}\n")
    assert main(["ablate", str(suite), "train.steps=2", "train.eval_every=2", "--out", str(tmp_path / "out")]) == 0
    for variant in ("dense", "mom"):
        stored = yaml.safe_load((tmp_path / "out" / "runs" / variant / "seed0" / "spec.yaml").read_text())
        assert stored["train"]["steps"] == 2
        assert json.loads((tmp_path / "out" / "runs" / variant / "seed0" / "result.json").read_text())["step"] == 2


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_validate_checks_every_variant_of_a_shipped_suite(path, capsys):
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.strip()
    suite = yaml.safe_load(path.read_text())
    assert len(out.splitlines()) == 1 and out.startswith(f"{path}: valid suite, ")
    assert f"x {len(suite['seeds'])} seeds, baseline {suite['baseline']!r}: " in out


def test_validate_names_a_suites_bad_variant_and_its_field(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY % "synthetic")
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\nbase: tiny.yaml\nbaseline: dense\nvariants:\n  dense: {routing.specific: dense}\n"
                     "  wide: {backbone.d_state: -4}\n")
    assert main(["validate", str(suite)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"{suite}: variant 'wide' (seed 0) is not a valid spec: backbone.d_state: Input should be "
                           f"greater than 0")
    assert main(["validate", str(suite), "backbone.d_state=8", "train.lr=0"]) == 2
    assert "variant 'dense' (seed 0) is not a valid spec: train.lr: Input should be greater than 0" in \
        capsys.readouterr().err
    suite.write_text(suite.read_text().replace("tiny.yaml", "missing.yaml"))
    assert main(["validate", str(suite)]) == 2
    assert capsys.readouterr().err.strip() == f"{suite}: base spec file '{tmp_path / 'missing.yaml'}' does not exist"


def test_a_suite_given_for_a_spec_and_a_spec_for_a_suite_say_which_command_takes_them(tmp_path, capsys):
    spec, suite = EXAMPLES[0], SUITES[0]
    for command in (["train", str(suite)], ["info", str(suite)]):
        assert main(command) == 2
        assert capsys.readouterr().err.strip() == (
            f"{suite} is a suite (it has a `base`), not a spec; run it with `momkit ablate {suite} --out DIR`, or "
            f"check every variant with `momkit validate {suite}`")
    assert main(["ablate", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert f"train a model spec with `momkit train {spec}`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_diff_lists_the_fields_two_specs_differ_in(capsys):
    examples = Path(__file__).parents[1] / "examples"
    assert main(["diff", str(examples / "mamba_mom.yaml"), str(examples / "mamba_dense.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == ['name: "mamba-mom" -> "mamba-dense"', 'routing.specific: "mom" -> "dense"']
    assert main(["diff", str(examples / "mamba_mom.yaml"), str(examples / "hybrid_attention.yaml")]) == 0
    out = capsys.readouterr().out
    assert "layers: (absent) -> " not in out and 'layers.3.backbone.kind: (absent) -> "attention"' in out
    assert main(["diff", str(examples / "mamba_mom.yaml"), str(examples / "mamba_mom.yaml")]) == 0
    assert "are the same spec" in capsys.readouterr().out

"""Bidirectional spans in a model, diffusion sampling of continuous spans, and ``momkit sample``."""

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import yaml

import momkit.plugins.objectives
from momkit import Batch, ModalitySchedule, ScheduleRule, build_model
from momkit.cli import main
from momkit.generation import Denoising, generate
from momkit.plugins.data import shapes
from momkit.plugins.objectives import DiffusionConfig, _alpha_bar
from momkit.spec import ModelSpec

PERIOD = ord(".")


def spec(kind="mamba", bidirectional=("image",), prediction="noise", **extra):
    options = {"mamba": {"d_state": 4, "dt_rank": 2}, "mamba2": {"d_state": 4, "headdim": 8, "chunk_size": 4},
               "transformer": {"n_heads": 4, "n_kv_heads": 2}}[kind]
    return {"name": "t", "modalities": ["text", {"kind": "image", "latent_dim": 6}],
            "backbone": {"kind": kind, "d_model": 16, "n_layers": 2, **options}, "routing": {"specific": "all"},
            "bidirectional": list(bidirectional),
            "objectives": {"image": {"kind": "diffusion", "prediction": prediction, "timesteps": 100}}, **extra}


def random_model(gen, **kwargs):
    model = build_model(spec(**kwargs)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" not in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.4)
    return model


def prompt(gen, length=6):
    tokens = torch.randint(0, 256, (1, length), generator=gen)
    tokens[0, -1] = PERIOD
    return Batch(modality=torch.zeros(1, length, dtype=torch.int64), tokens=tokens)


def image_rule(count=5):
    return ModalitySchedule(default="text", rules=(ScheduleRule("text", PERIOD, "image", count),))


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "transformer"])
def test_an_image_span_sees_itself_whole_in_a_model(gen, kind):
    model = random_model(gen, kind=kind)
    modality = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]])
    batch = Batch(modality=modality, tokens=torch.randint(0, 256, (1, 8), generator=gen),
                  latents={"image": torch.randn(1, 8, 6, generator=gen, dtype=torch.float64)})
    hidden = model(batch).hidden
    later = {"image": batch.latents["image"].clone()}
    later["image"][0, 5] += 1
    changed = model(Batch(modality=modality, tokens=batch.tokens, latents=later)).hidden
    assert (changed[0, 2] - hidden[0, 2]).abs().max() > 1e-3
    torch.testing.assert_close(changed[0, :2], hidden[0, :2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["noise", "x0", "velocity"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_one_step_returns_the_x0_prediction(gen, prediction, sampler):
    model = random_model(gen, prediction=prediction)
    start = prompt(gen)
    result = generate(model, start, 5, schedule=image_rule(), generator=torch.Generator().manual_seed(7),
                      denoising=Denoising(steps=1, sampler=sampler))
    noise = torch.randn(5, 6, generator=torch.Generator().manual_seed(7)).double()
    latents = torch.zeros(1, 11, 6, dtype=torch.float64)
    latents[0, 6:] = noise
    steps = torch.zeros(1, 11, dtype=torch.float64)
    steps[0, 6:] = 100.0
    modality = torch.tensor([[0] * 6 + [1] * 5])
    tokens = torch.cat([start.tokens, torch.zeros(1, 5, dtype=torch.int64)], 1)
    out = model(Batch(modality=modality, tokens=tokens, latents={"image": latents},
                      timesteps={"image": steps})).predictions["image"]
    a = float(_alpha_bar(DiffusionConfig(kind="diffusion", timesteps=100))[-1])
    x0 = {"noise": (noise - math.sqrt(1 - a) * out) / math.sqrt(a), "x0": out,
          "velocity": math.sqrt(a) * noise - math.sqrt(1 - a) * out}[prediction]
    torch.testing.assert_close(result.latents["image"][0, 6:], x0.to(result.latents["image"].dtype))
    assert torch.equal(result.modality[0, 6:], torch.ones(5, dtype=torch.int64))


@pytest.mark.parametrize("bidirectional", [(), ("image",)])
def test_sampling_is_deterministic_under_a_seed(gen, bidirectional):
    model = random_model(gen, bidirectional=bidirectional)
    start = prompt(gen)

    def draw(seed):
        return generate(model, start, 8, schedule=image_rule(), generator=torch.Generator().manual_seed(seed),
                        denoising=Denoising(steps=4, sampler="ddpm", guidance=1.5))

    first, again, other = draw(3), draw(3), draw(4)
    assert torch.equal(first.latents["image"], again.latents["image"]) and torch.equal(first.tokens, again.tokens)
    assert (first.latents["image"] - other.latents["image"]).abs().max() > 1e-3


@pytest.mark.parametrize("kind,bidirectional", [("mamba", ("image",)), ("mamba2", ()), ("transformer", ("image",))])
def test_prefilled_generation_equals_the_whole_sequence_path(gen, monkeypatch, kind, bidirectional):
    model = random_model(gen, kind=kind, bidirectional=bidirectional)
    start = prompt(gen)

    def draw():
        return generate(model, start, 9, schedule=image_rule(4), temperature=0,
                        generator=torch.Generator().manual_seed(5),
                        denoising=Denoising(steps=3, sampler="ddpm", guidance=2.0))

    assert model.can_prefill
    prefilled = draw()
    monkeypatch.setattr(type(model), "can_prefill", property(lambda self: False))
    whole = draw()
    assert torch.equal(prefilled.tokens, whole.tokens)
    torch.testing.assert_close(prefilled.latents["image"], whole.latents["image"], rtol=1e-9, atol=1e-9)


def test_text_after_an_image_is_the_argmax_of_the_full_forward(gen):
    model = random_model(gen)
    result = generate(model, prompt(gen), 9, schedule=image_rule(4), temperature=0,
                      denoising=Denoising(steps=2))
    assert result.modality[0].tolist() == [0] * 6 + [1] * 4 + [0] * 5
    hidden = model(Batch(modality=result.modality, tokens=result.tokens, latents=result.latents)).hidden
    assert torch.equal(model.heads["text"](hidden[0, 9:14]).argmax(-1), result.tokens[0, 10:15])


def test_a_bidirectional_model_decodes_text_as_the_causal_one(gen):
    model = random_model(gen)
    causal = build_model(spec(bidirectional=())).double().eval()
    causal.load_state_dict({k: v for k, v in model.state_dict().items() if k in causal.state_dict()})
    start = prompt(gen)
    ours = generate(model, start, 5, schedule=ModalitySchedule(default="text"), temperature=0)
    theirs = generate(causal, start, 5, schedule=ModalitySchedule(default="text"), temperature=0)
    assert torch.equal(ours.tokens, theirs.tokens)
    state = model.allocate_state(1)
    with pytest.raises(ValueError, match="bidirectional modality image, whose span is seen whole"):
        model.step(torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64), state,
                   {"image": torch.zeros(1, 6, dtype=torch.float64)})


@pytest.mark.parametrize("options,message", [
    (Denoising(steps=0), "denoising steps must be a positive int"),
    (Denoising(sampler="euler"), "sampler 'euler' is not one of ddim, ddpm"),
    (Denoising(guidance=-1.0), "guidance must be >= 0"),
])
def test_bad_denoising_options_are_named(gen, options, message):
    model = random_model(gen)
    with pytest.raises(ValueError, match=message):
        generate(model, prompt(gen), 5, schedule=image_rule(), denoising=options)


def test_bidirectional_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="bidirectional modality 'text' is trained with next_token"):
        ModelSpec.model_validate(spec(bidirectional=("text",)))
    with pytest.raises(ValueError, match="bidirectional names 'video', not modalities of this spec"):
        ModelSpec.model_validate(spec(bidirectional=("video",)))


@pytest.mark.parametrize("image", [{"latent_dim": 48}, {"vocab_size": 64}])
def test_the_shapes_decoder_round_trips_its_encoder(image, tmp_path):
    model_spec = ModelSpec.model_validate({"name": "t", "modalities": ["text", {"kind": "image", **image}],
                                           "backbone": {"kind": "mamba", "d_model": 8, "n_layers": 1},
                                           "data": {"kind": "shapes", "cache_dir": str(tmp_path),
                                                    "codebook_documents": 64}})
    codec = shapes.decoders(model_spec.dataset(), model_spec.modalities)["image"]
    images = shapes.render([shapes.draw_scene(model_spec.dataset(), "eval", i) for i in range(16)], 16)
    encoded = codec.encode(images)
    assert codec.length == 16 and encoded.shape[:2] == (16, 16)
    if "latent_dim" in image:
        assert np.array_equal(codec.decode(encoded), images)
    else:
        assert np.array_equal(codec.encode(codec.decode(encoded)), encoded)


def test_momkit_sample_draws_a_png_grid_from_a_run(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps({
        "name": "tiny", "modalities": ["text", {"kind": "image", "name": "image_latent", "latent_dim": 8}],
        "backbone": {"kind": "mamba", "d_model": 16, "n_layers": 1, "d_state": 4}, "routing": {"specific": "mom"},
        "bidirectional": ["image_latent"],
        "data": {"kind": "shapes", "cache_dir": str(tmp_path / "cache"), "codebook_documents": 64},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 64, "eval_every": 1, "eval_batches": 1,
                  "device": "cpu"}}))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "a red circle.", "--prompt", "a blue cross.", "--per-prompt",
                 "3", "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    picture = matplotlib.image.imread(tmp_path / "out" / "samples.png")
    assert picture.shape[:2] == (2 * 130 - 2, 3 * 130 - 2)
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle."] * 3 + ["a blue cross."] * 3
    assert np.array(records[0]["values"]).shape == (16, 8)
    assert main(["sample", str(run), "--prompt", "x", "--count", "5"]) == 2
    assert "does not fit the decoder of 'image_latent'" in capsys.readouterr().err


@pytest.mark.parametrize("prediction", ["noise", "x0", "velocity"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_the_samplers_draw_the_data_distribution_given_the_ideal_denoiser(prediction, sampler):
    """For data N(0, s^2) the best denoiser is known in closed form; sampling with it recovers the spread s."""
    config = DiffusionConfig(kind="diffusion", timesteps=200, prediction=prediction)
    objective = momkit.plugins.objectives.Diffusion(config, "image", 1, 1)
    alpha_bar, s = objective.alpha_bar, 2.5

    def ideal(x, t):
        a = alpha_bar[int(t) - 1]
        x0 = a.sqrt() * s ** 2 * x / (a * s ** 2 + 1 - a)
        eps = (1 - a).sqrt() * x / (a * s ** 2 + 1 - a)
        return {"noise": eps, "x0": x0, "velocity": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]

    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drawn = objective.sample(ideal, noise, 100, sampler, torch.Generator().manual_seed(1))
    assert abs(float(drawn.std()) / s - 1) < 0.03 and abs(float(drawn.mean())) < 0.1


TINY = ["train.batch_size=2", "train.seq_len=64", "train.eval_every=1", "train.eval_batches=1", "backbone.d_model=16",
        "backbone.n_layers=1", "backbone.d_state=4", "data.codebook_documents=64"]


def test_momkit_sample_draws_from_the_transfusion_suites_bidirectional_mom_run(tmp_path, capsys):
    suite = Path(__file__).parents[1] / "examples" / "suites" / "transfusion.yaml"
    out = tmp_path / "suite"
    assert main(["ablate", str(suite), *TINY, f"data.cache_dir={tmp_path / 'cache'}", "--out", str(out),
                 "--max-steps", "2", "--device", "cpu"]) == 0
    run = out / "runs" / "bidirectional_mom" / "seed0"
    assert yaml.safe_load((run / "spec.yaml").read_text())["bidirectional"] == ["image_latent"]
    assert main(["sample", str(run), "--prompt", "a large red circle at the top left.", "--per-prompt", "2",
                 "--steps", "2"]) == 0
    assert matplotlib.image.imread(run / "samples" / "samples.png").shape[:2] == (128, 2 * 130 - 2)

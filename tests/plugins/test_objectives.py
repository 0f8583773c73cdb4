"""The objectives: the diffusion objective's schedules, its prediction targets against a float64 reference, and
its steps reaching the model through their embedding."""

import math

import pytest
import torch

from momkit import Batch, account, build_model
from momkit.model import ModelOutput
from momkit.registry import get_registry
from momkit.spec import ModelSpec

SPEC = {"name": "d", "modalities": ["text", {"kind": "image", "name": "latent", "latent_dim": 3}],
        "backbone": {"kind": "mamba", "d_model": 16, "n_layers": 1, "d_state": 4}, "routing": {"specific": "mom"},
        "scan_backend": "reference"}


def diffusion(**settings):
    config = get_registry().get("objective", "diffusion").config.model_validate({"kind": "diffusion", **settings})
    spec = ModelSpec.model_validate(SPEC)
    return get_registry().get("objective", "diffusion").build(config, spec.modalities[1], 1)


def batch(gen):
    modality = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1, 1, 1]])
    latents = {"latent": torch.randn(2, 8, 3, generator=gen, dtype=torch.float64)}
    return Batch(modality=modality, tokens=torch.randint(0, 256, (2, 8), generator=gen), latents=latents,
                 seq_idx=torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]]))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_fall_from_clean_to_noise(schedule):
    abar = diffusion(schedule=schedule, timesteps=100).alpha_bar
    assert abar.shape == (100,) and bool((abar[1:] < abar[:-1]).all())
    assert 0.99 < float(abar[0]) <= 1.0 and float(abar[-1]) < 0.05


@pytest.mark.parametrize("prediction", ["noise", "x0", "velocity"])
def test_targets_match_a_float64_reference(gen, prediction):
    objective = diffusion(prediction=prediction, timesteps=50)
    clean = batch(gen)
    noised, target = objective.prepare(clean, torch.Generator().manual_seed(3))
    where = clean.modality == 1
    steps = noised.timesteps["latent"]
    assert torch.equal(steps[where], steps[where].round()) and 1 <= steps[where].min() and steps[where].max() <= 50
    # one step per segment: a run of latent positions in one document
    assert steps[0, 2] == steps[0, 3] == steps[0, 4] and steps[1, 0] == steps[1, 2]
    abar = objective.alpha_bar[(steps - 1).long()][..., None]
    x0, xt = clean.latents["latent"], noised.latents["latent"]
    eps = (xt - abar.sqrt() * x0) / (1 - abar).sqrt()
    expected = {"noise": eps, "x0": x0, "velocity": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[prediction]
    torch.testing.assert_close(target, expected[where], rtol=1e-10, atol=1e-10)
    assert torch.equal(xt[~where], x0[~where])
    guess = torch.randn(target.shape, generator=gen, dtype=torch.float64)
    output = ModelOutput(hidden=None, predictions={"latent": guess}, targets={"latent": where})
    loss, count = objective(output, noised, target)
    assert count == int(where.sum())
    assert math.isclose(float(loss), float((guess - expected[where]).square().mean(-1).sum()), rel_tol=1e-6)


def test_the_step_reaches_the_model_and_its_embedding_learns(gen):
    torch.manual_seed(0)
    model = build_model(SPEC).double()
    clean = batch(gen)
    noised, _ = diffusion().prepare(clean, torch.Generator().manual_seed(3))
    out = model(noised)
    later = Batch(noised.modality, noised.tokens, noised.latents, noised.seq_idx,
                  {"latent": noised.timesteps["latent"] + 100})
    moved = model(later).hidden - out.hidden
    first_latent = (clean.modality == 1).float().argmax(dim=1)
    for row, start in enumerate(first_latent.tolist()):
        assert torch.equal(moved[row, :start], torch.zeros_like(moved[row, :start]))
        assert moved[row, start].abs().max() > 1e-6
    out.predictions["latent"].square().sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in model.timestep_embeddings["latent"].parameters())


def test_clean_latents_are_step_zero(gen):
    torch.manual_seed(0)
    model = build_model(SPEC).double()
    clean = batch(gen)
    zero = Batch(clean.modality, clean.tokens, clean.latents, clean.seq_idx,
                 {"latent": torch.zeros(2, 8, dtype=torch.float64)})
    torch.testing.assert_close(model(clean).hidden, model(zero).hidden, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"batch.timesteps has \['text'\], not continuous modalities"):
        model(Batch(clean.modality, clean.tokens, clean.latents, clean.seq_idx, {"text": zero.timesteps["latent"]}))


def test_accounting_counts_the_step_embedding_with_the_adapter():
    spec = ModelSpec.model_validate(SPEC)
    model = build_model(spec)
    acc = account(spec, seq_len=8)
    embedding = sum(p.numel() for p in model.timestep_embeddings["latent"].parameters())
    assert acc.adapters["latent"] == sum(p.numel() for p in model.adapters["latent"].parameters()) + embedding
    assert acc.total == sum(p.numel() for p in model.parameters())
    assert acc.training_flops["latent"]["adapter"] == 3 * (2.0 * 3 * 16 + 2.0 * (256 * 16 + 16 * 16))

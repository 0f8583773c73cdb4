"""The whole model: inputs checked at the edge, predictions per modality, generation through the step path."""

import pytest
import torch

import momkit
from momkit import Batch, ModalitySchedule, ScheduleRule, build_model, ops

MODALITIES = ["text", {"kind": "image", "name": "image_vq", "vocab_size": 40},
              {"kind": "image", "name": "image_latent", "latent_dim": 6}]


def spec(routing="mom", modalities=MODALITIES, kind="mamba", **backbone):
    options = {"mamba": {"d_state": 4, "dt_rank": 2}, "mamba2": {"d_state": 4, "headdim": 8, "chunk_size": 4},
               "transformer": {"n_heads": 4, "n_kv_heads": 2}}[kind]
    return {"name": "test", "modalities": modalities, "routing": {"specific": routing},
            "backbone": {"kind": kind, "d_model": 16, "n_layers": 2, **options, **backbone}}


def random_model(gen, **kwargs):
    model = build_model(spec(**kwargs)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" not in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.4)
    return model


def random_batch(gen, model, batch=2, length=19, modalities=None):
    n = len(model.modalities)
    modality = torch.randint(0, n if modalities is None else modalities, (batch, length), generator=gen)
    tokens = torch.randint(0, 40, (batch, length), generator=gen)
    latents = {m.name: torch.randn(batch, length, m.latent_dim, generator=gen, dtype=torch.float64)
               for m in model.modalities if not m.discrete}
    return Batch(modality=modality, tokens=tokens, latents=latents)


def test_forward_predictions_per_modality(gen):
    model = random_model(gen)
    batch = random_batch(gen, model)
    out = model(batch)
    assert out.hidden.shape == (2, 19, 16)
    for i, m in enumerate(model.modalities):
        width = m.vocab_size if m.discrete else m.latent_dim
        assert out.predictions[m.name].shape == (int(out.targets[m.name].sum()), width)
        if m.discrete:
            assert torch.equal(out.targets[m.name][:, 0], torch.zeros(2, dtype=torch.bool))
            assert torch.equal(out.targets[m.name][:, 1:], batch.modality[:, 1:] == i)
    loss = sum(p.square().mean() for p in out.predictions.values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_discrete_predictions_come_from_the_previous_position(gen):
    model = random_model(gen)
    batch = random_batch(gen, model)
    out = model(batch)
    text = out.targets["text"].nonzero()
    row, pos = (int(v) for v in text[0])
    expected = model.heads["text"](out.hidden[row, pos - 1])
    torch.testing.assert_close(out.predictions["text"][0], expected)


def test_packed_documents_do_not_predict_across_boundaries(gen):
    model = random_model(gen)
    batch = random_batch(gen, model, batch=1, length=12, modalities=1)
    batch.seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    out = model(batch)
    assert not bool(out.targets["text"][0, 5])
    assert int(out.targets["text"].sum()) == 10
    alone = model(Batch(modality=batch.modality[:, 5:], tokens=batch.tokens[:, 5:]))
    torch.testing.assert_close(out.hidden[:, 5:], alone.hidden, rtol=1e-12, atol=1e-12)


def test_final_norm_is_routable():
    routed = build_model(spec(routing=["in_proj", "final_norm"]))
    assert routed.final_norm.weight.shape == (3, 16)
    assert build_model(spec(routing="all")).final_norm.weight.shape == (3, 16)
    assert build_model(spec(routing="mom")).final_norm.weight.shape == (16,)
    assert routed.blocks[0].routed == {"in_proj"}


@pytest.mark.parametrize("change,message", [
    (lambda b: setattr(b, "tokens", b.tokens.masked_fill(b.modality == 0, 300)),
     "token id 300 at batch row 0, position .* out of range for modality 'text' .vocab_size 256.: valid ids are "
     "0..255"),
    (lambda b: setattr(b, "tokens", None), "batch.tokens must be a .2, 19. int64 tensor since discrete modality"),
    (lambda b: setattr(b, "latents", {}), r"batch.latents\['image_latent'\] must be \(2, 19, 6\)"),
    (lambda b: setattr(b, "latents", {**b.latents, "video": b.modality}), r"batch.latents has \['video'\]"),
    (lambda b: setattr(b, "modality", b.modality + 3), r"valid ids: 0 = text, 1 = image_vq, 2 = image_latent"),
    (lambda b: setattr(b, "seq_idx", torch.zeros(2, 18, dtype=torch.int64)), "batch.seq_idx must be"),
])
def test_bad_batches_are_named(gen, change, message):
    model = random_model(gen)
    batch = random_batch(gen, model)
    change(batch)
    with pytest.raises(ValueError, match=message):
        model(batch)


def greedy_matches_full_forward(model, generation, prompt_lengths):
    """Every generated token is the argmax of the full forward's prediction for its position."""
    for row in range(generation.tokens.shape[0]):
        n = int(generation.lengths[row])
        out = model(Batch(modality=generation.modality[row:row + 1, :n], tokens=generation.tokens[row:row + 1, :n]))
        for m in model.modalities:
            if not m.discrete:
                continue
            targets = out.targets[m.name][0].nonzero()[:, 0]
            picked = out.predictions[m.name].argmax(-1)
            for position, token in zip(targets.tolist(), picked.tolist()):
                if position >= int(prompt_lengths[row]):
                    assert int(generation.tokens[row, position]) == token, (row, position)


@pytest.mark.parametrize("kind,routing", [("mamba", "mom"), ("mamba2", "mom"), ("transformer", "mot")])
def test_greedy_generation_equals_argmax_of_full_forward(gen, kind, routing):
    model = random_model(gen, modalities=["text", {"kind": "image", "vocab_size": 40}], kind=kind, routing=routing)
    prompt = random_batch(gen, model, batch=3, length=7)
    lengths = torch.tensor([7, 3, 5])
    schedule = ModalitySchedule(default="text", rules=(ScheduleRule(after="text", after_token=5, then="image",
                                                                    count=4),))
    result = model.generate(prompt, 12, prompt_lengths=lengths, temperature=0, schedule=schedule)
    assert result.tokens.shape == (3, 19) and result.lengths.tolist() == [19, 15, 17]
    for row in range(3):
        n = int(lengths[row])
        assert torch.equal(result.tokens[row, :n], prompt.tokens[row, :n])
    greedy_matches_full_forward(model, result, lengths)


@pytest.mark.parametrize("kind,routing", [("mamba", "mom"), ("mamba", "all"), ("mamba2", "mom"), ("mamba2", "all"),
                                          ("transformer", "mot")])
def test_prefill_then_steps_equal_the_full_forward(gen, kind, routing):
    model = random_model(gen, kind=kind, routing=routing)
    batch = random_batch(gen, model, batch=2, length=17)
    full = model(batch).hidden
    state = model.allocate_state(2, 17)
    latents = {k: v[:, :11] for k, v in batch.latents.items()}
    first = model.prefill(batch.tokens[:, :11], batch.modality[:, :11], state, latents)
    rest = [model.step(batch.tokens[:, t], batch.modality[:, t], state, {k: v[:, t] for k, v in batch.latents.items()})
            for t in range(11, 17)]
    torch.testing.assert_close(torch.cat([first, torch.stack(rest, 1)], 1), full, rtol=1e-10, atol=1e-10)


def test_eager_generation_checks_the_front_doors_at_its_first_step_only(gen, monkeypatch):
    from momkit.ops import checks
    model = random_model(gen, modalities=["text", {"kind": "image", "vocab_size": 40}])
    prompt = random_batch(gen, model, batch=2, length=5)
    calls = []
    real = checks.expect_tensor
    monkeypatch.setattr(checks, "expect_tensor", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = []
    for new_tokens in (3, 9):
        calls.clear()
        model.generate(prompt, new_tokens, temperature=0)
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0
    checked = model.generate(prompt, 9, temperature=0)
    with pytest.raises(ValueError, match="modality holds ids"):
        ops.routed_linear(torch.randn(2, 3), torch.randn(2, 4, 3), None, torch.full((2,), 7))
    greedy_matches_full_forward(model, checked, torch.tensor([5, 5]))


def test_greedy_generation_prefills_a_long_prompt(gen):
    model = random_model(gen, modalities=["text"])
    assert model.can_prefill
    prompt = random_batch(gen, model, batch=2, length=40)
    result = model.generate(prompt, 6, temperature=0)
    greedy_matches_full_forward(model, result, torch.tensor([40, 40]))


def test_schedule_switches_modality_after_trigger(gen):
    model = random_model(gen, modalities=["text", {"kind": "image", "vocab_size": 40}])
    prompt = Batch(modality=torch.zeros(1, 3, dtype=torch.int64), tokens=torch.tensor([[1, 2, 9]]))
    schedule = ModalitySchedule(default="text", rules=(ScheduleRule(after="text", after_token=9, then="image",
                                                                    count=4),))
    result = model.generate(prompt, 6, temperature=0.8, top_k=5, schedule=schedule,
                            generator=torch.Generator().manual_seed(0))
    assert result.modality[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert int(result.tokens[0, 3:7].max()) < 40


def test_generation_rejects_bad_options(gen):
    model = random_model(gen)
    prompt = random_batch(gen, model, batch=1, length=4, modalities=1)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        model.generate(prompt, 0)
    with pytest.raises(ValueError, match="schedule default 'image_latent' is continuous"):
        model.generate(prompt, 2, schedule=ModalitySchedule(default="image_latent"))
    with pytest.raises(ValueError, match="schedule names modality 'audio'"):
        model.generate(prompt, 2, schedule=ModalitySchedule(default="audio"))
    with pytest.raises(ValueError, match=r"prompt_lengths must be \(1,\) with values in 1..4"):
        model.generate(prompt, 2, prompt_lengths=torch.tensor([5]))


def test_top_k_one_is_greedy(gen):
    model = random_model(gen, modalities=["text"])
    prompt = random_batch(gen, model, batch=2, length=5)
    greedy = model.generate(prompt, 6, temperature=0)
    top1 = model.generate(prompt, 6, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy.tokens, top1.tokens)


def test_public_names():
    for name in ("build_model", "Batch", "Model", "ModalitySchedule", "ScheduleRule", "account"):
        assert hasattr(momkit, name)


def test_sampling_draws_from_the_softmax_of_the_top_k():
    from momkit.generation import _sample
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0]).repeat(40000, 1)
    drawn = _sample(logits, 0.7, 4, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=5).double()
    kept = torch.tensor([True, True, True, False, True])
    expected = torch.softmax(torch.where(kept, logits[0] / 0.7, float("-inf")), 0).double() * len(drawn)
    assert counts[3] == 0
    sigma = (expected * (1 - expected / len(drawn))).sqrt()
    assert ((counts - expected).abs()[kept] < 4 * sigma[kept]).all(), (counts, expected)


def test_cuda_graph_option_is_checked(gen):
    model = random_model(gen, modalities=["text"])
    prompt = random_batch(gen, model, batch=1, length=4)
    with pytest.raises(ValueError, match="cuda_graph must be None .* True or False, got 'yes'"):
        model.generate(prompt, 2, cuda_graph="yes")
    with pytest.raises(ValueError, match="cuda_graph=True needs the model and the prompt on a CUDA device, got cpu"):
        model.generate(prompt, 2, cuda_graph=True)
    assert model.can_capture and not random_model(gen, kind="transformer", routing="mot").can_capture


GRAPH_KINDS = [("mamba", "mom"), ("mamba2", "mom"), ("mamba", "dense")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind,routing", GRAPH_KINDS)
def test_graphed_generation_equals_eager(gen, kind, routing):
    from momkit.generation import _CAPTURED
    model = random_model(gen, modalities=["text", {"kind": "image", "vocab_size": 40}], kind=kind, routing=routing)
    model = model.float().cuda().eval()
    prompt = random_batch(gen, model, batch=3, length=7)
    prompt = Batch(modality=prompt.modality.cuda(), tokens=prompt.tokens.cuda())
    options = dict(prompt_lengths=torch.tensor([7, 3, 5], device="cuda"), schedule=ModalitySchedule(
        default="text", rules=(ScheduleRule(after="text", after_token=5, then="image", count=4),)))
    eager = model.generate(prompt, 12, temperature=0, cuda_graph=False, **options)
    graphed = model.generate(prompt, 12, temperature=0, **options)
    assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.modality, eager.modality)
    assert len(_CAPTURED[model]) == 1
    again = model.generate(prompt, 20, temperature=0, **options)
    assert len(_CAPTURED[model]) == 1, "a longer generation in the same length bucket captured again"
    for row, n in enumerate(graphed.lengths.tolist()):
        assert torch.equal(again.tokens[row, :n], graphed.tokens[row, :n])

    def draw(seed):
        return model.generate(prompt, 12, temperature=1.0, top_k=8, **options,
                              generator=torch.Generator("cuda").manual_seed(seed)).tokens

    first, same, other = draw(1), draw(1), draw(2)
    assert torch.equal(first, same) and not torch.equal(first, other)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_refused_for_a_model_that_cannot_capture(gen):
    model = random_model(gen, modalities=["text"], kind="transformer", routing="mot").float().cuda()
    prompt = random_batch(gen, model, batch=1, length=4)
    prompt = Batch(modality=prompt.modality.cuda(), tokens=prompt.tokens.cuda())
    with pytest.raises(ValueError, match=r"cannot be captured: blocks \['TransformerBlock'\]"):
        model.generate(prompt, 2, cuda_graph=True)
    assert model.generate(prompt, 2, temperature=0).tokens.shape == (1, 6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_that_cannot_be_captured_decodes_eagerly(gen):
    model = build_model({**spec(modalities=["text"]), "scan_backend": "reference"}).float().cuda().eval()
    prompt = random_batch(gen, model, batch=2, length=4)
    prompt = Batch(modality=prompt.modality.cuda(), tokens=prompt.tokens.cuda())
    eager = model.generate(prompt, 5, temperature=0, cuda_graph=False)
    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph"):
        fallback = model.generate(prompt, 5, temperature=0)
    assert torch.equal(fallback.tokens, eager.tokens)
    with pytest.raises(ValueError, match="capturing the decoding step failed"):
        model.generate(prompt, 5, temperature=0, cuda_graph=True)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_decoding_sees_parameters_changed_in_place(gen, kind):
    model = random_model(gen, modalities=["text"], kind=kind)
    tokens, modality = torch.tensor([3, 7]), torch.zeros(2, dtype=torch.int64)

    def two_steps(m):
        with torch.no_grad():
            state = m.allocate_state(2)
            m.step(tokens, modality, state)
            return m.step(tokens.flip(0), modality, state)

    before = two_steps(model)
    with torch.no_grad():
        for block in model.blocks:
            block.A_log.add_(0.5)
    fresh = build_model(model.spec).double()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(two_steps(model), two_steps(fresh), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for block in model.blocks:
            block.A_log.add_(0.5)
            block.D.mul_(2.0)
    fresh = build_model(model.spec).double()
    fresh.load_state_dict(model.state_dict())
    after = two_steps(model)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, two_steps(fresh), rtol=1e-12, atol=1e-12)


def test_padded_lockstep_rows_do_not_change_the_real_rows(gen):
    """The graphed path pads the batch to a power of two by repeating row 0; run eagerly here, the padded loop
    writes the same tokens into the real rows as the unpadded one."""
    from momkit.generation import _Lockstep, _RowSchedule

    model = random_model(gen, modalities=["text", {"kind": "image", "vocab_size": 40}]).eval()
    prompt = random_batch(gen, model, batch=3, length=7)
    lengths, new = [7, 3, 5], 6
    rules = {(0, 5): (1, 3)}
    total = 7 + new

    def run(rows_in_buffer):
        tokens = torch.zeros(3, total, dtype=torch.int64)
        modality = torch.zeros_like(tokens)
        tokens[:, :7], modality[:, :7] = prompt.tokens, prompt.modality
        rows = [_RowSchedule(default=0, rules=rules) for _ in range(3)]
        loop = _Lockstep(model, rows_in_buffer, 64, (0, 1), rules, (), 0.0, None)
        loop.load(tokens, modality, {}, lengths, new, rows, 0)
        with torch.no_grad():
            for _ in range(total - 1):
                loop.step()
        return loop.tokens[:3, :total], loop.modality[:3, :total]

    plain, padded = run(3), run(4)
    assert torch.equal(plain[0], padded[0]) and torch.equal(plain[1], padded[1])


def test_generation_leaves_the_global_generator_alone(gen):
    model = random_model(gen, modalities=["text"])
    prompt = random_batch(gen, model, batch=2, length=4)
    for options in (dict(temperature=0), dict(temperature=0.9, generator=torch.Generator().manual_seed(5))):
        torch.manual_seed(11)
        expected = torch.rand(3)
        torch.manual_seed(11)
        model.generate(prompt, 4, **options)
        assert torch.equal(torch.rand(3), expected), options


def test_kept_graphs_follow_sizes_parameters_and_the_model(gen, monkeypatch):
    """The policy of the graphs kept per model, with capture stubbed out (it needs a GPU): bucketed sizes share
    one, an in-place parameter change or new options capture again, at most KEEP_GRAPHS are kept, a dropped model
    frees them, and a failed capture warns and decodes eagerly (or raises with cuda_graph=True)."""
    import gc
    import weakref

    from momkit import generation

    captured = []

    class Capture:
        def __init__(self, loop):
            captured.append(loop)
            self.loop = loop

    monkeypatch.setattr(generation, "_Graphed", Capture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    model = random_model(gen, modalities=["text"]).eval()

    def decoder(batch, total, temperature=0.0):
        return generation._decoder(model, None, batch, total, (0,), {}, (), temperature, None)

    first = decoder(3, 10)
    assert decoder(4, 60) is first and len(captured) == 1
    assert first.loop.tokens.shape == (4, 64)
    assert decoder(4, 70) is not first and decoder(3, 10, 0.5) is not first and len(captured) == 3
    with torch.no_grad():
        model.final_norm.weight.mul_(1.5)
    assert decoder(3, 10) is not first and len(captured) == 4
    decoder(1, 10)
    assert len(generation._CAPTURED[model]) == generation.KEEP_GRAPHS
    kept, held = weakref.ref(model), weakref.ref(first)
    del model, first, captured[:]
    gc.collect()
    assert kept() is None and held() is None, "the kept graphs hold their model, or outlive it"

    class Failing(Capture):
        def __init__(self, loop):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(generation, "_Graphed", Failing)
    model = random_model(gen, modalities=["text"]).eval()
    options = ((0,), {}, (), 0.0, None)
    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph .*not permitted"):
        assert isinstance(generation._decoder(model, None, 2, 10, *options), generation._Lockstep)
    with pytest.raises(ValueError, match="capturing the decoding step failed"):
        generation._decoder(model, True, 2, 10, *options)

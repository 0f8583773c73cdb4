"""Learned experts: identical experts are the dense layer, the router learns, capacity drops match a float64
reference dispatch, per-modality experts stay in their modality, and the specs, logs and accounting."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

import momkit
from momkit import SpecError
from momkit.blocks import Layout
from momkit.cli import main
from momkit.experts import group_order, mutual_information

FFN = {"kind": "ffn", "d_model": 16}
EXPERTS = {"sublayers": ["w1", "w2", "w3"], "n_experts": 4}


def _block(experts: dict, backbone: dict = FFN, specific="dense", seed: int = 0):
    torch.manual_seed(seed)
    spec = {"modalities": ["text", "image"], "backbone": backbone,
            "routing": {"specific": specific, "experts": experts}, "scan_backend": "reference"}
    block = momkit.build_block(spec).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return block


def _inputs(seed: int = 1, b: int = 2, length: int = 24, d: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, length, d, generator=gen, dtype=torch.float64),
            torch.randint(0, 2, (b, length), generator=gen))


@pytest.mark.parametrize("experts,backbone,specific", [
    ({**EXPERTS, "top_k": 2}, FFN, "dense"),
    ({**EXPERTS, "top_k": 1, "per_modality": True}, FFN, ["norm"]),
    ({"sublayers": ["in_proj", "x_proj", "out_proj"], "n_experts": 3, "top_k": 2},
     {"kind": "mamba", "d_model": 16, "d_state": 4}, ["dt_proj"]),
], ids=["ffn-top2", "ffn-per-modality", "mamba-top2"])
def test_identical_experts_equal_the_dense_layer(experts, backbone, specific):
    block = _block(experts, backbone, specific)
    dense = momkit.build_block({"modalities": ["text", "image"], "backbone": backbone,
                                "routing": {"specific": specific}, "scan_backend": "reference"}).double()
    with torch.no_grad():
        weights = dict(block.named_parameters())
        for name, p in dense.named_parameters():
            source = weights[name]
            if source.shape != p.shape:
                source[:] = source[:1].clone()
                source = source[0]
            p.copy_(source)
    x, modality = _inputs()
    torch.testing.assert_close(block(x, modality), dense(x, modality), rtol=1e-12, atol=1e-12)


def test_a_subclass_that_changes_run_is_mixed_from_its_runs():
    """A subclass of a block with a residual branch that overrides ``run`` alone loses ``residual``, since the branch
    it inherits no longer gives its run: its experts are mixed from whole runs, ``x + g (run - x)``."""
    from momkit.plugins.transformer import FFNBlock

    class Doubled(FFNBlock):
        def run(self, x, layout, state=None):
            return x + 2 * self.branch(x, layout)

    assert FFNBlock.residual and not Doubled.residual
    block = _block({**EXPERTS, "top_k": 2})
    block.__class__ = Doubled
    x, modality = _inputs()
    layout = Layout.of(modality)
    runs = block._mix(x, block._route(x, modality, True), lambda j: block.run(x, layout), True)
    torch.testing.assert_close(block(x, modality), runs, rtol=1e-12, atol=1e-12)


def test_router_learns_from_the_task_loss_at_top_1():
    block = _block({**EXPERTS, "top_k": 1})
    x, modality = _inputs(2)
    (block(x, modality) * torch.randn_like(x)).sum().backward()
    assert block.router.proj.weight.grad.abs().sum() > 0
    exact = _block({**EXPERTS, "top_k": 1, "gradient": "exact"})
    (exact(x, modality) * torch.randn_like(x)).sum().backward()
    assert exact.router.proj.weight.grad.abs().max() < 1e-12


def _reference(block, x, modality, factor):
    """Float64 dispatch written out token by token: route, keep the first slots of each expert up to its
    capacity (slot 0 of all tokens before slot 1), and mix the kept experts' feed-forward outputs."""
    e, k = block.experts.n_experts, block.experts.top_k
    flat, w = x.reshape(-1, x.shape[-1]), block.router.proj.weight
    logits = (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6)) @ w.T
    probs = logits.softmax(-1)
    top_p, top_e = probs.topk(k, dim=-1)
    capacity = math.ceil(factor * k * len(flat) / e)
    taken, keep = [0] * e, torch.zeros_like(top_e, dtype=torch.bool)
    for j in range(k):
        for t in range(len(flat)):
            if taken[top_e[t, j]] < capacity:
                taken[top_e[t, j]] += 1
                keep[t, j] = True
    out = flat.clone()
    norm = block.norm(flat, torch.zeros(len(flat), dtype=torch.long))
    for t in range(len(flat)):
        for j in range(k):
            if keep[t, j]:
                i = top_e[t, j]
                hidden = F.silu(block.w1.weight[i] @ norm[t]) * (block.w3.weight[i] @ norm[t])
                out[t] += top_p[t, j] / top_p[t].sum() * (block.w2.weight[i] @ hidden)
    return out.reshape(x.shape), keep


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_drops_match_a_float64_reference(top_k):
    block = _block({**EXPERTS, "top_k": top_k, "capacity_factor": 0.75})
    x, modality = _inputs(3, length=30)
    expected, keep = _reference(block, x, modality, 0.75)
    with torch.no_grad():
        got = block(x, modality)
    assert 0 < block.router_stats.dropped == int((~keep).sum())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    block.eval()
    with torch.no_grad():
        block(x, modality)
    assert block.router_stats.dropped == 0


@pytest.mark.parametrize("top_k", [1, 2])
def test_a_position_wise_block_runs_its_experts_on_its_positions_sorted_by_expert(top_k, monkeypatch):
    """The ``ffn`` block gathers its positions into the order of their experts once, so that its expert sublayers
    get the ids' groups (no ``order``), and computes what it computes through the order, forward and every gradient,
    with a norm per modality (which the sorted positions' modalities route) and a capacity that drops slots."""
    block = _block({**EXPERTS, "top_k": top_k, "capacity_factor": 0.75}, specific=["norm"])
    x, modality = _inputs(4, length=30)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hints = []
    real = momkit.ops.routed_linear

    def recording(*args, **kwargs):
        hints.append((kwargs.get("order") is not None, kwargs.get("groups") is not None))
        return real(*args, **kwargs)

    def results():
        hints.clear()
        leaf = x.clone().requires_grad_(True)
        y = block(leaf, modality)
        return [y, *torch.autograd.grad((y * weights).sum(), [leaf, *block.parameters()])]

    monkeypatch.setattr(momkit.ops, "routed_linear", recording)
    grouped = results()
    assert hints == [(False, True)] * 3 * top_k
    block.position_wise = False
    through_order = results()
    assert hints == [(True, False)] * 3 * top_k
    assert block.router_stats.dropped > 0
    for got, expected in zip(grouped, through_order):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _router_reference(router, x, modality, factor):
    """The router's decision and statistics written out token by token in float64: per router set (one, or one
    per modality), the Switch load-balancing loss ``n_experts * sum_i f_i P_i`` averaged over the sets present,
    the z-loss, and the capacity of each expert id over its set's tokens, slot 0 of all tokens before slot 1."""
    experts, n_modalities = router.experts, router.n_modalities
    e, k = experts.n_experts, experts.top_k
    flat, mods = x.reshape(-1, x.shape[-1]), modality.reshape(-1).tolist()
    h = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6)
    w = router.proj.weight.detach()
    logits = torch.stack([h[t] @ (w[mods[t]] if experts.per_modality else w).T for t in range(len(flat))])
    probs = logits.softmax(-1)
    top_p, top_e = probs.topk(k, dim=-1)
    sets = mods if experts.per_modality else [0] * len(mods)
    ids = [[sets[t] * e + int(top_e[t, j]) for j in range(k)] for t in range(len(flat))]
    balance, present = 0.0, 0
    for s in sorted(set(sets)):
        tokens = [t for t in range(len(flat)) if sets[t] == s]
        f = [sum(int(top_e[t, j]) == i for t in tokens for j in range(k)) / (k * len(tokens)) for i in range(e)]
        mass = [sum(float(probs[t, i]) for t in tokens) / len(tokens) for i in range(e)]
        balance += e * sum(fi * pi for fi, pi in zip(f, mass))
        present += 1
    taken, keep = {}, [[False] * k for _ in flat]
    counts = torch.zeros(n_modalities, router.n_ids, dtype=torch.long)
    for j in range(k):
        for t in range(len(flat)):
            tokens = sum(sets[u] == sets[t] for u in range(len(flat)))
            if taken.get(ids[t][j], 0) < math.ceil(factor * k * tokens / e):
                taken[ids[t][j]] = taken.get(ids[t][j], 0) + 1
                keep[t][j] = True
                counts[mods[t], ids[t][j]] += 1
    gates = top_p / top_p.sum(-1, keepdim=True) * torch.tensor(keep, dtype=torch.float64)
    z = torch.logsumexp(logits, -1).square().mean()
    return dict(ids=torch.tensor(ids), gates=gates, balance=balance / present, z=float(z), counts=counts,
                dropped=sum(not kept for row in keep for kept in row))


@pytest.mark.parametrize("top_k,per_modality", [(1, False), (2, False), (1, True), (2, True)])
def test_router_statistics_match_a_float64_reference(top_k, per_modality):
    """The router's expert ids, gates, load-balancing loss, z-loss, kept slots per modality and id, and dropped
    slots, in training with a capacity, against the token-by-token float64 reference."""
    block = _block({**EXPERTS, "top_k": top_k, "per_modality": per_modality, "capacity_factor": 0.75})
    x, modality = _inputs(5, length=30)
    modality[0, :20] = 0
    route = block.router(x, modality, True)
    expected = _router_reference(block.router, x, modality, 0.75)
    assert route.ids.reshape(-1, top_k).tolist() == expected["ids"].tolist()
    torch.testing.assert_close(route.gates.reshape(-1, top_k), expected["gates"], rtol=1e-12, atol=1e-12)
    assert route.stats.balance.item() == pytest.approx(expected["balance"], rel=1e-12)
    assert route.stats.z.item() == pytest.approx(expected["z"], rel=1e-12)
    assert route.stats.counts.tolist() == expected["counts"].tolist()
    assert 0 < int(route.stats.dropped) == expected["dropped"]
    assert route.stats.slots == top_k * modality.numel()
    assert torch.equal(route.order, torch.argsort(route.ids.reshape(-1, top_k).t().reshape(-1), stable=True))


@pytest.mark.parametrize("top_k,per_modality", [(1, False), (2, True)])
def test_the_z_loss_and_its_gradient_are_those_of_the_log_sum_exp(top_k, per_modality):
    """The z-loss, taken from the top logit and its probability, and its gradient in the router's weight equal
    those of ``logsumexp(logits)`` squared and averaged, in float64."""
    block = _block({**EXPERTS, "top_k": top_k, "per_modality": per_modality})
    x, modality = _inputs(7, length=40)
    weight = block.router.proj.weight
    z = block.router(x, modality, True).stats.z
    logits = momkit.ops.router_logits(x, weight, modality if per_modality else None, eps=1e-6)
    expected = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(z, weight)[0], torch.autograd.grad(expected, weight)[0],
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("top_k,per_modality", [(1, False), (2, True)])
def test_router_computes_in_float32_under_autocast(top_k, per_modality):
    """Under bfloat16 autocast the router's ids, gates and losses are those of float32, as computed without."""
    block = _block({**EXPERTS, "top_k": top_k, "per_modality": per_modality}).float()
    x, modality = _inputs(6, length=64)
    plain = block.router(x.float(), modality, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = block.router(x.float(), modality, True)
    assert torch.equal(mixed.ids, plain.ids) and torch.equal(mixed.gates, plain.gates)
    assert mixed.gates.dtype == torch.float32
    assert torch.equal(mixed.stats.balance, plain.stats.balance) and torch.equal(mixed.stats.z, plain.stats.z)


def test_capacity_serves_slot_0_first():
    """Four tokens, two slots each, two experts of capacity ceil(0.5 * 2 * 4 / 2) = 2: slot 0 of every token
    before slot 1."""
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    modality = torch.tensor([0, 1, 1, 0])
    order, keep, picks, counts, dropped = momkit.ops.expert_slots(ids, modality, 2, 2, n_experts=2,
                                                                  capacity_factor=0.5)
    assert keep.tolist() == [[True, True], [True, False], [True, False], [False, False]]
    assert order.tolist() == [0, 1, 3, 6, 2, 4, 5, 7]
    assert picks.tolist() == [4, 4] and counts.tolist() == [[1, 1], [1, 1]] and int(dropped) == 4


@pytest.mark.parametrize("n_ids", [2, 256, 257, 32768, 32769])
def test_group_order_is_the_stable_argsort_whatever_the_key_width(gen, n_ids):
    """Ids up to each narrow key dtype's limit and one past it (few distinct values, so the sort's stability
    decides most of the order)."""
    ids = torch.tensor([0, n_ids - 1])[torch.randint(0, 2, (3000,), generator=gen)]
    ids[::7] = torch.randint(0, n_ids, (len(ids[::7]),), generator=gen)
    assert torch.equal(group_order(ids.view(30, 100), n_ids), torch.argsort(ids, stable=True))


def test_per_modality_experts_stay_in_their_modality():
    block = _block({**EXPERTS, "per_modality": True, "top_k": 2})
    x, modality = _inputs(4)
    block(x, modality)
    counts = block.router_stats.counts
    assert counts.shape == (2, 8)
    assert counts[0, 4:].sum() == 0 and counts[1, :4].sum() == 0 and counts.sum() == 2 * modality.numel()
    assert mutual_information(counts)[1] == pytest.approx(1.0)


def test_mutual_information():
    assert mutual_information(torch.tensor([[5, 5], [5, 5]]))[0] == pytest.approx(0.0)
    info, share = mutual_information(torch.tensor([[7, 0], [0, 3]]))
    entropy = -(0.7 * math.log2(0.7) + 0.3 * math.log2(0.3))
    assert info == pytest.approx(entropy) and share == pytest.approx(1.0)


def test_decoding_top_2_experts_equals_forward():
    block = _block({"sublayers": ["in_proj", "out_proj"], "n_experts": 3, "top_k": 2},
                   {"kind": "mamba", "d_model": 16, "d_state": 4}).eval()
    x, modality = _inputs(5, length=12)
    with torch.no_grad():
        full = block(x, modality)
        state = block.decoding_state(2)
        steps = torch.stack([block.step(x[:, t], modality[:, t], state) for t in range(12)], dim=1)
        with pytest.raises(SpecError, match="decodes 2 branches"):
            block.step(x[:, 0], modality[:, 0], block.allocate_state(2))
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("override,message", [
    ("layers.1.routing.experts.top_k=9", "top_k (9) exceeds n_experts (8); valid top_k: 1..8"),
    ("layers.1.routing.experts.sublayers=[norm]", "layers.1: routing.experts.sublayers names 'norm', which is not a "
                                                  "linear sublayer of backbone 'ffn'; its linear sublayers: w1, w2, w3"),
    ("layers.1.routing.experts.sublayers=[w4]", "'w4', not a sublayer of backbone 'ffn'"),
    ("layers=[{},{},{}]", "backbone.n_layers (4) must be a multiple of the 3 entries of layers"),
])
def test_bad_experts_specs_exit_2_naming_the_field(override, message, capsys):
    assert main(["validate", "examples/moe_mamba.yaml", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("examples/moe_mamba.yaml: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("per_modality", [False, True])
def test_accounting_counts_top_k_of_the_experts_and_a_per_modality_routers_share(per_modality):
    spec = momkit.ModelSpec.model_validate({
        "name": "x", "modalities": ["text", "image"], "backbone": {**FFN, "n_layers": 2},
        "routing": {"specific": "dense", "experts": {**EXPERTS, "top_k": 2, "per_modality": per_modality}}})
    rows = {s.name: s for s in momkit.account(spec, 64).sublayers}
    ids = 4 * (2 if per_modality else 1)
    assert rows["w1"].routing == "experts" and rows["w1"].active * ids == rows["w1"].total * 2
    router = rows["router"]
    assert router.total == 2 * 16 * ids
    assert (router.routing, router.active) == (("routed", router.total // 2) if per_modality else
                                              ("shared", router.total))


@pytest.mark.parametrize("example", ["moe_mamba", "modality_experts"])
def test_example_specs_train_and_log_the_router(example, tmp_path, capsys):
    path = f"examples/{example}.yaml"
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    total = int(out.split("| total")[1].split("|")[2].replace(",", ""))
    active = int(out.split("active per text token")[1].split("|")[3].replace(",", ""))
    assert active < total
    assert main(["train", path, "backbone.d_model=32", "train.seq_len=64", "train.batch_size=2",
                 "train.eval_every=5", "train.eval_batches=1", "--max-steps", "10", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["split"] == "train"]
    assert len(train_lines) == 10 and all(r["aux/balance"] > 0 and "dropped" in r for r in train_lines)
    evaluation = [r for r in lines if r["split"] == "eval"][-1]
    assert set(evaluation["expert_load"]) == {"text", "image"} and "router_mi" in evaluation
    assert sum(evaluation["expert_load"]["text"]) == pytest.approx(1.0, abs=1e-4)


def test_sparse_upcycling_starts_every_expert_as_the_dense_weight(tmp_path):
    dense = {"name": "dense", "modalities": ["text", "image"],
             "backbone": {"kind": "transformer", "d_model": 16, "n_heads": 2, "n_layers": 2}}
    source = momkit.build_model(dense)
    moe = {**dense, "name": "moe", "routing": {"specific": "dense", "experts": {"sublayers": ["ffn"], "n_experts": 4,
                                                                                  "top_k": 2}}}
    model = momkit.load(source, spec=moe)
    for block, original in zip(model.blocks, source.blocks):
        for copy in block.ffn.w1.weight:
            assert torch.equal(copy, original.ffn.w1.weight)
    tokens = torch.randint(0, 256, (2, 12))
    batch = momkit.Batch(modality=torch.zeros_like(tokens), tokens=tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).hidden, source(batch).hidden, rtol=1e-5, atol=1e-5)
    with pytest.raises(SpecError, match="transformers has no routed model"):
        momkit.export(model, tmp_path / "nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backbone,experts", [
    (FFN, {**EXPERTS, "top_k": 2, "capacity_factor": 1.0}),
    ({"kind": "mamba", "d_model": 16, "d_state": 4}, {"sublayers": ["in_proj", "out_proj"], "n_experts": 4}),
], ids=["ffn", "mamba"])
def test_triton_experts_match_the_reference_backend(backbone, experts):
    blocks = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        blocks[backend] = momkit.build_block({"modalities": ["text", "image"], "backbone": backbone,
                                              "routing": {"specific": "dense", "experts": experts},
                                              "scan_backend": backend}).cuda()
    x, modality = (t.cuda() for t in _inputs(7, b=4, length=256))
    x = x.float().requires_grad_(True)
    dout = torch.randn_like(x)
    results = {}
    for backend, block in blocks.items():
        y = block(x, modality)
        results[backend] = (y, *torch.autograd.grad(y, [x, *block.parameters()], dout))
    for got, expected in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_pass_drops_the_last_pass_statistics_before_routing():
    block = _block({**EXPERTS, "capacity_factor": 1.0})
    x, modality = _inputs()
    seen = []
    block.router.register_forward_pre_hook(lambda module, args: seen.append(block.router_stats))
    for _ in range(2):
        torch.autograd.grad(block(x, modality).sum(), list(block.parameters()))
    assert seen == [None, None] and block.router_stats is not None

    spec = {"name": "stats", "modalities": ["text"], "backbone": {"kind": "ffn", "d_model": 16, "n_layers": 3},
            "routing": {"specific": "dense", "experts": EXPERTS}, "scan_backend": "reference"}
    model = momkit.build_model(spec)
    tokens = torch.randint(0, 256, (2, 12))
    batch = momkit.Batch(modality=torch.zeros_like(tokens), tokens=tokens)
    held = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: held.append(
        [b.router_stats is not None for b in model.blocks]))
    for _ in range(2):
        model(batch).router.aux_loss.backward()
    assert held == [[False] * 3] * 2 and all(b.router_stats is not None for b in model.blocks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
def test_a_training_step_captured_after_an_eager_one_replays_it(autocast):
    """Also under bfloat16 autocast, where on Hopper and later the expert sublayers take PyTorch's grouped GEMM."""
    torch.manual_seed(0)
    block = momkit.build_block({"modalities": ["text", "image"], "backbone": {"kind": "ffn", "d_model": 64},
                                "routing": {"specific": "dense", "experts": {**EXPERTS, "capacity_factor": 1.0}},
                                "scan_backend": "triton"}).cuda()
    x, modality = (t.cuda() for t in _inputs(3, b=4, length=128, d=64))
    x = x.float()
    dout = torch.randn_like(x)

    def step():
        leaf = x.detach().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = block(leaf, modality)
        return (y.detach(), *torch.autograd.grad(y, [leaf, *block.parameters()], dout))

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, expected in zip(captured, eager):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

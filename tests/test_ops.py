"""The scan front doors: argument checks before any kernel, backend choice, and the reference behind them."""

import pytest
import torch

import momkit
from momkit import hookimpl, ops
from momkit.descriptors import ScanBackend
from momkit.kernels import reference
from momkit.kernels.reference import REFERENCE
from momkit.kernels.reference.naive import naive_selective_scan, naive_ssd_scan
from momkit.registry import Registry, use_registry


def selective_args(gen, b=2, d=6, n=4, l=9, groups=None):
    bc = (b, n, l) if groups is None else (b, groups, n, l)
    return dict(u=torch.randn(b, d, l, generator=gen), delta=torch.randn(b, d, l, generator=gen),
                A=-torch.rand(d, n, generator=gen) - 0.5, B=torch.randn(*bc, generator=gen),
                C=torch.randn(*bc, generator=gen))


def ssd_args(gen, b=2, l=9, h=4, p=3, g=2, n=5):
    return dict(x=torch.randn(b, l, h, p, generator=gen), dt=torch.rand(b, l, h, generator=gen),
                A=-torch.rand(h, generator=gen) - 0.5, B=torch.randn(b, l, g, n, generator=gen),
                C=torch.randn(b, l, g, n, generator=gen), chunk_size=4)


def test_available_backends_lists_reference():
    assert "reference" in ops.available_backends()


def test_auto_picks_reference_on_cpu():
    assert ops.resolve_backend("auto", "cpu", "selective_scan").name == "reference"


def test_unknown_backend_lists_known(gen):
    with pytest.raises(ValueError, match=r"unknown scan backend 'fast'; registered backends: \[.*'reference'"):
        ops.selective_scan(**selective_args(gen), backend="fast")


def test_front_doors_match_naive(gen):
    args = selective_args(gen, groups=2)
    D, z = torch.randn(6, generator=gen), torch.randn(2, 6, 9, generator=gen)
    torch.testing.assert_close(ops.selective_scan(**args, D=D, z=z, delta_softplus=True),
                               naive_selective_scan(**args, D=D, z=z, delta_softplus=True))
    sargs = ssd_args(gen)
    seq_idx = torch.tensor([[0] * 5 + [1] * 4, [0] * 9], dtype=torch.int32)
    out, final = ops.ssd_scan(**sargs, seq_idx=seq_idx, return_final_states=True)
    ref, ref_final = naive_ssd_scan(**{k: v for k, v in sargs.items() if k != "chunk_size"}, seq_idx=seq_idx,
                                    return_final_states=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(final, ref_final)


@pytest.mark.parametrize("change,message", [
    (dict(delta=torch.zeros(2, 6, 8)), r"delta has shape \(2, 6, 8\); expected \(b, d, l\) = \(2, 6, 9\)"),
    (dict(A=torch.zeros(6)), r"A has shape \(6,\); expected \(d, n\) = \(6, \*\)"),
    (dict(B=torch.zeros(2, 4, 8)), r"B has shape \(2, 4, 8\); expected \(b, n, l\) = \(2, 4, 9\) or "
                                   r"\(b, g, n, l\)"),
    (dict(C=torch.zeros(2, 1, 4, 9)), r"C has shape \(2, 1, 4, 9\); expected same as B = \(2, 4, 9\)"),
    (dict(B=torch.zeros(2, 4, 4, 9), C=torch.zeros(2, 4, 4, 9)), "4 groups, which does not divide d = 6"),
    (dict(D=torch.zeros(5)), r"D has shape \(5,\); expected \(d,\) = \(6,\)"),
    (dict(z=torch.zeros(2, 6, 9, dtype=torch.int64)), "z has dtype torch.int64; expected one of"),
    (dict(u=torch.zeros(2, 6, 9, device="meta")), "delta is on cpu but the other inputs are on meta"),
    (dict(A=torch.zeros(3, 6, 4), modality=torch.full((2, 9), 3)), r"modality holds ids in \[3, 3\] but A has 3"),
    (dict(modality=torch.zeros(2, 9, dtype=torch.int64)),
     r"A has shape \(6, 4\); expected \(M, d, n\) = \(\*, 6, \*\)"),
    (dict(A=torch.zeros(3, 6, 4), modality=torch.zeros(2, 9)), "modality has dtype torch.float32; expected an "
                                                               "integer dtype"),
])
def test_selective_scan_checks(gen, change, message):
    with pytest.raises(ValueError, match=message):
        ops.selective_scan(**{**selective_args(gen), **change})


@pytest.mark.parametrize("change,message", [
    (dict(dt=torch.zeros(2, 9, 3)), r"dt has shape \(2, 9, 3\); expected \(b, l, h\) = \(2, 9, 4\)"),
    (dict(A=torch.zeros(4, 1)), r"A has shape \(4, 1\); expected \(h,\) = \(4,\)"),
    (dict(B=torch.zeros(2, 9, 3, 5), C=torch.zeros(2, 9, 3, 5)), "3 groups, which does not divide h = 4"),
    (dict(D=torch.zeros(4, 2)), r"D has shape \(4, 2\); expected \(h,\) = \(4,\) or \(h, p\) = \(4, 3\)"),
    (dict(initial_states=torch.zeros(2, 4, 3, 4)), r"initial_states has shape \(2, 4, 3, 4\); expected "
                                                   r"\(b, h, p, n\) = \(2, 4, 3, 5\)"),
    (dict(seq_idx=torch.zeros(2, 9)), "seq_idx has dtype torch.float32; expected an integer dtype"),
    (dict(chunk_size=0), "chunk_size must be a positive int, got 0"),
    (dict(chunk_size=4.0), "chunk_size must be a positive int, got 4.0"),
])
def test_ssd_scan_checks(gen, change, message):
    with pytest.raises(ValueError, match=message):
        ops.ssd_scan(**{**ssd_args(gen), **change})


def test_non_tensor_is_a_type_error(gen):
    with pytest.raises(TypeError, match="u must be a torch.Tensor, got list"):
        ops.selective_scan(**{**selective_args(gen), "u": [1.0]})


def routed_args(gen, shape=(2, 5), K=6, O=4, M=3):
    return dict(x=torch.randn(*shape, K, generator=gen), weight=torch.randn(M, O, K, generator=gen),
                bias=torch.randn(M, O, generator=gen), modality=torch.randint(0, M, shape, generator=gen))


def test_routed_linear_applies_each_positions_own_weights(gen):
    args = routed_args(gen)
    y = ops.routed_linear(**args)
    ref = torch.einsum("blk,blok->blo", args["x"], args["weight"][args["modality"]]) + args["bias"][args["modality"]]
    torch.testing.assert_close(y, ref)


def test_routed_linear_follows_autocast(gen):
    args = routed_args(gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.routed_linear(**args)
    assert y.dtype == torch.bfloat16


def test_routed_linear_float32_master_weights(gen):
    """Float32 weights beside bfloat16 tokens (given so, or under autocast) reach a backend that declares
    ``"float32_weights"`` as they are and any other cast to bfloat16; both compute the products of the rounded
    weights, and the weights' gradients come in float32."""
    seen = {}

    def recording(name, extensions):
        def call(**kwargs):
            seen[name] = (kwargs["weight"].dtype, kwargs["bias"].dtype)
            return reference.routed_linear(**{k: v.to(kwargs["x"].dtype) if k in ("weight", "bias") else v
                                              for k, v in kwargs.items()})
        return ScanBackend(name=name, description="records the dtypes", routed_linear=call, devices=("cpu",),
                           extensions=frozenset(extensions))

    class Plugin:
        @hookimpl
        def momkit_scan_backends(self):
            return [recording("wide", {"float32_weights"}), recording("narrow", set())]

    registry = Registry()
    registry.register(Plugin(), distribution="tests")
    args = routed_args(gen)
    rounded = {**args, "x": args["x"].bfloat16(), "weight": args["weight"].bfloat16(), "bias": args["bias"].bfloat16()}
    expected = ops.routed_linear(**rounded)
    with use_registry(registry):
        for backend, dtypes in (("wide", (torch.float32, torch.float32)), ("narrow", (torch.bfloat16,) * 2)):
            leaves = {k: v.clone().requires_grad_(True) for k, v in args.items() if k in ("weight", "bias")}
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = ops.routed_linear(**{**args, **leaves}, backend=backend)
            assert seen.pop(backend) == dtypes and torch.equal(y, expected), backend
            y.float().sum().backward()
            assert leaves["weight"].grad.dtype == leaves["bias"].grad.dtype == torch.float32, backend
            given = ops.routed_linear(**{**args, "x": args["x"].bfloat16()}, backend=backend)
            assert seen.pop(backend) == dtypes and torch.equal(given, expected), backend


@pytest.mark.parametrize("change,message", [
    (dict(weight=torch.zeros(3, 4, 5)), r"weight has shape \(3, 4, 5\); expected \(M, out, in\) = \(\*, \*, 6\)"),
    (dict(weight=torch.zeros(3, 4, 6, dtype=torch.float64)), "weight has dtype torch.float64 but x has torch.float32"),
    (dict(x=torch.zeros(2, 5, 6, dtype=torch.bfloat16), weight=torch.zeros(3, 4, 6, dtype=torch.float16)),
     "weight has dtype torch.float16 but x has torch.bfloat16; pass weight in x's dtype, or in torch.float32"),
    (dict(bias=torch.zeros(3, 4, dtype=torch.bfloat16)), "bias has dtype torch.bfloat16 but weight has torch.float32"),
    (dict(bias=torch.zeros(2, 4)), r"bias has shape \(2, 4\); expected \(M, out\) = \(3, 4\)"),
    (dict(modality=torch.zeros(2, 4, dtype=torch.int64)), r"modality has shape \(2, 4\); expected x's leading "
                                                          r"shape = \(2, 5\)"),
    (dict(modality=torch.full((2, 5), 3)), r"modality holds ids in \[3, 3\] but weight has 3 modalities"),
])
def test_routed_linear_checks(gen, change, message):
    with pytest.raises(ValueError, match=message):
        ops.routed_linear(**{**routed_args(gen), **change})


def sorted_routed_args(gen, M=4, absent=2):
    """Routed-linear arguments in float64 with the positions sorted by id, one id absent, and ``groups``."""
    args = {k: v.double() if v.is_floating_point() else v for k, v in routed_args(gen, (40,), M=M).items()}
    modality = torch.randint(0, M - 1, (40,), generator=gen)
    modality = torch.sort(modality + (modality >= absent).long()).values
    return {**args, "modality": modality}, torch.bincount(modality, minlength=M).cumsum(0)


def test_routed_linear_groups_of_sorted_positions(gen, monkeypatch):
    """Positions sorted by id with their groups' ends (int64 or int32): the reference backend takes them where they
    lie, without a sort of its own, and computes each position's product with its own id's weights, forward and
    gradients, an absent id's gradient exactly zero."""
    args, groups = sorted_routed_args(gen)
    loss_weights = torch.linspace(-1, 2, 40 * 4, dtype=torch.float64).view(40, 4)

    def grads(fn):
        leaves = {k: args[k].clone().requires_grad_(True) for k in ("x", "weight", "bias")}
        y = fn(**{**args, **leaves})
        return [y, *torch.autograd.grad((y * loss_weights).sum(), list(leaves.values()))]

    expected = grads(lambda x, weight, bias, modality: torch.einsum("nk,nok->no", x, weight[modality]) + bias[modality])
    sorts = []
    real_argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: sorts.append(1) or real_argsort(*a, **k))
    for ends in (groups, groups.int()):
        got = grads(lambda **t: ops.routed_linear(**t, groups=ends, backend="reference"))
        for value, reference_value in zip(got, expected):
            torch.testing.assert_close(value, reference_value, rtol=1e-12, atol=1e-12)
        assert (got[2][2] == 0).all() and (got[3][2] == 0).all()
    assert not sorts


@pytest.mark.parametrize("change,message", [
    (dict(order=torch.arange(40)), "pass order .* or groups .*, not both"),
    (dict(groups=torch.tensor([3, 9, 40])), r"groups has shape \(3,\); expected \(M,\) = \(4,\)"),
    (dict(groups=torch.tensor([3, 9, 9, 41])), r"groups must hold where each id's positions end, \[.*\]; got "
                                               r"\[3, 9, 9, 41\]"),
    (dict(modality="unsorted"), r"groups needs the positions sorted by id, but modality falls from 3 to 0 at "
                                r"position 1"),
])
def test_routed_linear_groups_checks(gen, change, message):
    args, groups = sorted_routed_args(gen)
    if change.get("modality") == "unsorted":
        change = {"modality": torch.cat([args["modality"][-1:], args["modality"][:-1]])}
    with pytest.raises(ValueError, match=message):
        ops.routed_linear(**{**args, "groups": groups, **change}, backend="reference")


def router_args(gen, sets=3):
    return dict(x=torch.randn(2, 5, 6, generator=gen, dtype=torch.float64) * 2,
                weight=torch.randn(sets, 4, 6, generator=gen, dtype=torch.float64),
                modality=torch.randint(0, sets, (2, 5), generator=gen))


def test_router_logits_are_each_positions_routers_on_the_normalised_input(gen):
    """Against the formula per position in float64, for one router per modality and for one shared; under
    bfloat16 autocast the logits stay float32 and equal those without autocast."""
    args = router_args(gen)
    x, weight, modality = args.values()
    h = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ops.router_logits(**args), torch.einsum("bld,bled->ble", h, weight[modality]))
    torch.testing.assert_close(ops.router_logits(x, weight[1]), h @ weight[1].T)
    narrow = {**args, "x": x.float(), "weight": weight.float()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wide = ops.router_logits(**narrow)
    assert wide.dtype == torch.float32 and torch.equal(wide, ops.router_logits(**narrow))


def test_gated_mix_is_lerp_per_position(gen):
    x, y = torch.randn(2, 5, 6, generator=gen), torch.randn(2, 5, 6, generator=gen)
    gate = torch.rand(2, 5, 1, generator=gen)
    torch.testing.assert_close(ops.gated_mix(x, y, gate), x + gate * (y - x))


@pytest.mark.parametrize("change,message", [
    (dict(weight=torch.zeros(3, 4, 5)), r"weight has shape \(3, 4, 5\); expected \(e, d\) = \(\*, 6\) or "
                                        r"\(M, e, d\) = \(\*, \*, 6\)"),
    (dict(modality=None), r"weight \(M, e, d\) holds one router per modality; pass modality"),
    (dict(modality=torch.full((2, 5), 3)), r"modality holds ids in \[3, 3\] but weight has 3 modalities"),
    (dict(x=torch.zeros(2, 5, 6, dtype=torch.bfloat16)), "weight has dtype torch.float64 but x has torch.bfloat16"),
    (dict(eps=0.0), "eps must be a positive number, got 0.0"),
])
def test_router_logits_checks(gen, change, message):
    with pytest.raises(ValueError, match=message):
        ops.router_logits(**{**router_args(gen), **change})


def test_gated_residual_adds_the_gated_branch(gen):
    x, branch = torch.randn(2, 5, 6, generator=gen), torch.randn(2, 5, 6, generator=gen)
    gate = torch.rand(2, 5, 1, generator=gen)
    torch.testing.assert_close(ops.gated_residual(x, branch, gate), x + gate * branch)
    narrow = branch.bfloat16()
    mixed = ops.gated_residual(x, narrow, gate)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, x + gate * narrow.float())


def slot_args(gen):
    return dict(ids=torch.randint(0, 6, (7, 2), generator=gen), modality=torch.randint(0, 2, (7,), generator=gen),
                n_ids=6, n_modalities=2, n_experts=3, capacity_factor=1.25)


@pytest.mark.parametrize("change,message", [
    (dict(ids=torch.zeros(7, dtype=torch.long)), r"ids has shape \(7,\); expected \(N, top_k\) = \(\*, \*\)"),
    (dict(ids=torch.zeros(7, 2)), "ids has dtype torch.float32; expected an integer dtype"),
    (dict(modality=torch.zeros(6, dtype=torch.long)), r"modality has shape \(6,\); expected \(N,\) = \(7,\)"),
    (dict(n_ids=7), r"n_ids \(7\) must be a multiple of n_experts \(3\)"),
    (dict(n_experts=0), "n_experts must be a positive int, got 0"),
    (dict(capacity_factor=0), "capacity_factor must be a positive number, or None for no capacity, got 0"),
    (dict(ids=torch.full((7, 2), 6)), r"ids holds ids in \[6, 6\]; valid ids: 0..5"),
    (dict(modality=torch.full((7,), 2)), r"modality holds ids in \[2, 2\]; valid ids: 0..1"),
])
def test_expert_slots_checks(gen, change, message):
    with pytest.raises(ValueError, match=message):
        ops.expert_slots(**{**slot_args(gen), **change})


@pytest.mark.parametrize("change,message", [
    (dict(branch=torch.zeros(2, 5, 7)), r"branch has shape \(2, 5, 7\); expected x's shape = \(2, 5, 6\)"),
    (dict(branch=torch.zeros(2, 5, 6, dtype=torch.int64)), "branch has dtype torch.int64"),
    (dict(gate=torch.zeros(2, 5)), r"gate has shape \(2, 5\); expected \(..., 1\) = \(2, 5, 1\)"),
    (dict(gate=torch.zeros(2, 5, 1, dtype=torch.bfloat16)), "gate has dtype torch.bfloat16 but x has torch.float32"),
])
def test_gated_residual_checks(change, message):
    args = dict(x=torch.ones(2, 5, 6), branch=torch.ones(2, 5, 6), gate=torch.ones(2, 5, 1))
    with pytest.raises(ValueError, match=message):
        ops.gated_residual(**{**args, **change})


@pytest.mark.parametrize("change,message", [
    (dict(y=torch.zeros(2, 5, 7)), r"y has shape \(2, 5, 7\); expected x's shape = \(2, 5, 6\)"),
    (dict(gate=torch.zeros(2, 5)), r"gate has shape \(2, 5\); expected \(..., 1\) = \(2, 5, 1\)"),
    (dict(gate=torch.zeros(2, 5, 1, dtype=torch.float64)), "gate has dtype torch.float64 but x has torch.float32"),
])
def test_gated_mix_checks(change, message):
    args = dict(x=torch.ones(2, 5, 6), y=torch.ones(2, 5, 6), gate=torch.ones(2, 5, 1))
    with pytest.raises(ValueError, match=message):
        ops.gated_mix(**{**args, **change})


def test_unchecked_skips_the_checks_and_only_inside(gen, monkeypatch):
    from momkit.ops import checks
    seen = []
    real = checks.expect_tensor
    monkeypatch.setattr(checks, "expect_tensor", lambda name, *a, **k: seen.append(name) or real(name, *a, **k))
    args = routed_args(gen)
    with ops.unchecked():
        inside = ops.routed_linear(**args)
        ops.selective_state_update(**update_args(gen))
    assert seen == []
    torch.testing.assert_close(inside, ops.routed_linear(**args))
    assert seen == ["weight", "bias", "modality"]
    with pytest.raises(ValueError, match="bias has shape"):
        ops.routed_linear(**{**args, "bias": torch.zeros(2, 4)})


def update_args(gen, b=2, d=6, n=4):
    return dict(state=torch.zeros(b, d, n), x=torch.randn(b, d, generator=gen), dt=torch.randn(b, d, generator=gen),
                A=-torch.rand(d, n, generator=gen), B=torch.randn(b, n, generator=gen),
                C=torch.randn(b, n, generator=gen))


@pytest.mark.parametrize("change,message", [
    (dict(state=torch.zeros(2, 6, 4, dtype=torch.bfloat16)), "state has dtype torch.bfloat16; expected torch.float32"),
    (dict(dt=torch.zeros(2, 5)), r"dt has shape \(2, 5\); expected \(b, d\) = \(2, 6\)"),
    (dict(A=torch.zeros(3, 6, 4)), r"A has shape \(3, 6, 4\); expected \(d, n\) = \(6, 4\)"),
    (dict(A=torch.zeros(3, 6, 4), modality=torch.full((2,), 5)), r"modality holds ids in \[5, 5\] but A has 3"),
    (dict(D=torch.zeros(2, 6), modality=torch.zeros(3, dtype=torch.int64)), r"modality has shape \(3,\); "
                                                                            r"expected \(b,\) = \(2,\)"),
    (dict(B=torch.zeros(2, 1, 4)), r"B has shape \(2, 1, 4\); expected \(b, n\) = \(2, 4\)"),
])
def test_selective_state_update_checks(gen, change, message):
    with pytest.raises(ValueError, match=message):
        ops.selective_state_update(**{**update_args(gen), **change})


def test_conv_state_update_checks(gen):
    x, conv_state, weight = torch.randn(2, 5, generator=gen), torch.zeros(2, 5, 4), torch.randn(5, 4, generator=gen)
    with pytest.raises(ValueError, match="activation must be None or 'silu', got 'relu'"):
        ops.conv_state_update(x, conv_state, weight, activation="relu")
    with pytest.raises(ValueError, match=r"weight has shape \(2, 5, 4\); expected \(c, k\) = \(5, 4\)"):
        ops.conv_state_update(x, conv_state, weight.expand(2, 5, 4))


def test_auto_passes_over_a_backend_lacking_the_dtype(gen):
    class Fast:
        @hookimpl
        def momkit_scan_backends(self):
            return [ScanBackend(name="fast", description="float32 only", routed_linear=lambda **kw: "fast",
                                    devices=("cpu",), priority=10, dtypes=frozenset({torch.float32}))]

    registry = Registry()
    registry.register(reference, distribution="momkit")
    registry.register(Fast(), distribution="tests")
    args = routed_args(gen)
    with use_registry(registry):
        assert ops.routed_linear(**args) == "fast"
        wide = {k: v.double() if v.is_floating_point() else v for k, v in args.items()}
        torch.testing.assert_close(ops.routed_linear(**wide), ops.routed_linear(**wide, backend="reference"))
        with pytest.raises(ValueError, match=r"scan backend 'fast' cannot run routed_linear on cpu in "
                                             r"torch.float64 in this process; backends that can: \['reference'\]"):
            ops.routed_linear(**wide, backend="fast")


class Counting:
    """A backend plugin of every kernel operation, each the reference's, that counts its calls."""

    def __init__(self):
        self.calls = {op: 0 for op in OPS}

        def counted(op):
            def call(**kwargs):
                self.calls[op] += 1
                return getattr(REFERENCE, op)(**kwargs)
            return call

        self.backend = ScanBackend(name="counting", description="counts its calls", devices=("cpu",),
                                   priority=100, extensions=frozenset({"modality", "seq_idx"}),
                                   **{op: counted(op) for op in OPS})

    @hookimpl
    def momkit_scan_backends(self):
        return [self.backend]


OPS = ("selective_scan", "ssd_scan", "routed_linear", "causal_conv1d", "selective_state_update", "conv_state_update",
       "router_logits", "expert_slots", "gated_residual", "gated_mix")
USED = {"mamba": {"selective_scan", "routed_linear", "causal_conv1d", "selective_state_update", "conv_state_update"},
        "mamba2": {"ssd_scan", "routed_linear", "causal_conv1d", "selective_state_update", "conv_state_update"},
        "transformer": {"routed_linear"},
        "ffn": {"routed_linear", "router_logits", "expert_slots", "gated_residual", "gated_mix"}}
SMALL = {"mamba": {"d_model": 16, "d_state": 4}, "mamba2": {"d_model": 16, "d_state": 8, "headdim": 8, "chunk_size": 4},
         "transformer": {"d_model": 16, "n_heads": 2}, "ffn": {"d_model": 16}}
ROUTING = {"ffn": {"specific": "dense", "experts": {"sublayers": ["w1", "w2", "w3"], "n_experts": 3, "top_k": 1,
                                                    "per_modality": True}}}


@pytest.mark.parametrize("chosen", ["counting", "reference", "auto"])
@pytest.mark.parametrize("kind", sorted(USED))
def test_the_specs_backend_reaches_every_kernel_operation(gen, kind, chosen):
    counting = Counting()
    registry = Registry.from_entry_points()
    registry.register(counting, distribution="tests")
    spec = {"modalities": ["text", "image"], "backbone": {"kind": kind, **SMALL[kind]},
            "routing": ROUTING.get(kind, {"specific": "all"}), "scan_backend": chosen}
    with use_registry(registry):
        block = momkit.build_block(spec)
        x, modality = torch.randn(2, 9, 16, generator=gen), torch.randint(0, 2, (2, 9), generator=gen)
        block(x, modality).sum().backward()
        state = block.allocate_state(2)
        with torch.no_grad():
            block.step(x[:, 0], modality[:, 0], state)
    reached = {op for op, n in counting.calls.items() if n}
    assert reached == (USED[kind] if chosen in ("counting", "auto") else set()), counting.calls


def test_a_spec_chooses_the_backend_per_operation(gen):
    counting = Counting()
    registry = Registry.from_entry_points()
    registry.register(counting, distribution="tests")
    spec = {"modalities": ["text", "image"], "backbone": {"kind": "mamba", **SMALL["mamba"]},
            "routing": {"specific": "all"}, "scan_backend": {"routed_linear": "counting", "default": "reference"}}
    with use_registry(registry):
        block = momkit.build_block(spec)
        x, modality = torch.randn(2, 9, 16, generator=gen), torch.randint(0, 2, (2, 9), generator=gen)
        block(x, modality).sum().backward()
        with pytest.raises(ValueError, match=r"scan_backend names operation\(s\) 'scan'; valid keys: "
                                             r"selective_scan, ssd_scan, .*, default"):
            momkit.build_block({**spec, "scan_backend": {"scan": "reference"}})
        with pytest.raises(ValueError, match="unknown scan backend 'fastest'; registered: counting"):
            momkit.build_block({**spec, "scan_backend": {"selective_scan": "fastest"}})
    assert {op for op, n in counting.calls.items() if n} == {"routed_linear"}, counting.calls


def test_auto_ranks_backends_per_operation():
    def backend(name, priority):
        return ScanBackend(name=name, description=name, devices=("cpu",), priority=priority,
                           **{op: getattr(REFERENCE, op) for op in OPS})

    class Plugin:
        @hookimpl
        def momkit_scan_backends(self):
            return [backend("linear_first", {"routed_linear": 200, "default": 1}), backend("steady", 50)]

    registry = Registry.from_entry_points()
    registry.register(Plugin(), distribution="tests")
    with use_registry(registry):
        assert ops.resolve_backend("auto", "cpu", "routed_linear").name == "linear_first"
        assert ops.resolve_backend("auto", "cpu", "selective_scan").name == "steady"
        assert ops.resolve_backend({"default": "linear_first"}, "cpu", "ssd_scan").name == "linear_first"

"""torch.compile traces a block of every backbone, and two with learned experts (top 2 with a capacity; top 1 with a
router per modality), in one graph (the kernel front doors as torch.library operators), and the compiled block
computes what the eager one does, forward and backward (and with experts the router's statistics)."""

import pytest
import torch

import momkit

CASES = [
    ({"kind": "mamba", "d_model": 16, "d_state": 4}, "all", True),
    ({"kind": "mamba", "d_model": 16, "d_state": 4}, "mom", False),
    ({"kind": "mamba2", "d_model": 16, "d_state": 8, "headdim": 8, "chunk_size": 8}, "all", True),
    ({"kind": "transformer", "d_model": 16, "n_heads": 2}, "mot", True),
    ({"kind": "attention", "d_model": 16, "n_heads": 2}, "dense", False),
    ({"kind": "ffn", "d_model": 16}, "all", False),
    ({"kind": "ffn", "d_model": 16}, {"specific": "dense", "experts": {
        "sublayers": ["w1", "w2", "w3"], "n_experts": 4, "top_k": 2, "capacity_factor": 1.25}}, False),
    ({"kind": "ffn", "d_model": 16}, {"specific": "dense", "experts": {
        "sublayers": ["w1", "w2", "w3"], "n_experts": 4, "top_k": 1, "per_modality": True}}, False),
]


def case_id(value):
    if isinstance(value, dict):
        return value.get("kind", f"experts-top{value.get('experts', {}).get('top_k')}")
    return str(value)


def _assert_compiled_equals_eager(backbone, routing, packed, device, scan_backend, length, compile_options,
                                  tolerance):
    """``torch.compile(block, fullgraph=True)`` against the eager block: the output and every gradient."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = momkit.build_block({"modalities": ["text", "image"], "backbone": backbone,
                                "routing": routing if isinstance(routing, dict) else {"specific": routing},
                                "scan_backend": scan_backend}).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, length, 16, generator=gen, device=device, requires_grad=True)
    modality = torch.randint(0, 2, (2, length), generator=gen, device=device)
    seq_idx = (torch.arange(length, device=device) >= length // 2 - 2).long().expand(2, length).contiguous() \
        if packed else None
    weight = torch.randn(2, length, 16, generator=gen, device=device)
    compiled = torch.compile(block, fullgraph=True, **compile_options)
    results, stats = [], []
    for run in (compiled, block):
        y = run(x, modality, seq_idx)
        results.append((y, *torch.autograd.grad((y * weight).sum(), [x, *block.parameters()])))
        stats.append(block.router_stats)
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    if block.experts is not None:
        for name in ("balance", "z", "counts", "dropped"):
            torch.testing.assert_close(getattr(stats[0], name), getattr(stats[1], name), rtol=tolerance, atol=0)


@pytest.mark.parametrize("backbone,routing,packed", CASES, ids=case_id)
def test_compiled_block_equals_eager(backbone, routing, packed):
    _assert_compiled_equals_eager(backbone, routing, packed, "cpu", "auto", 24, {"backend": "aot_eager"}, 1e-6)


def test_compiled_routed_linear_passes_its_order():
    """Under torch.compile ``routed_linear``'s ``order`` still reaches a backend that takes it (the Triton one
    forms its tiles by it: without it, an experts layer's tiles would all be mixed)."""
    from momkit import hookimpl
    from momkit.descriptors import ScanBackend
    from momkit.kernels import reference
    from momkit.registry import Registry, use_registry

    seen = []

    class Plugin:
        @hookimpl
        def momkit_scan_backends(self):
            def call(order=None, **kwargs):
                seen.append(order)
                return reference.routed_linear(**kwargs)
            return [ScanBackend(name="ordered", description="records the order", routed_linear=call,
                                extensions=frozenset({"order"}))]

    registry = Registry()
    registry.register(Plugin(), distribution="tests")
    torch._dynamo.reset()
    ids = torch.tensor([2, 0, 1, 0, 2, 1])
    order = torch.argsort(ids, stable=True)
    x, weight = torch.randn(6, 5, requires_grad=True), torch.randn(3, 4, 5)

    def project(x, weight, ids, order):
        return momkit.ops.routed_linear(x, weight, None, ids, order=order, backend="ordered")

    with use_registry(registry):
        y = torch.compile(project, fullgraph=True, backend="aot_eager")(x, weight, ids, order)
        y.sum().backward()
    assert len(seen) == 2 and all(torch.equal(o, order) for o in seen)
    torch.testing.assert_close(y, torch.einsum("nk,nok->no", x, weight[ids]))


def test_last_state_is_refused_under_compile():
    torch._dynamo.reset()

    def scan(u, delta, A, B, C):
        return momkit.ops.selective_scan(u, delta, A, B, C, return_last_state=True)

    args = (torch.randn(1, 4, 6), torch.rand(1, 4, 6), -torch.rand(4, 3), torch.randn(1, 3, 6), torch.randn(1, 3, 6))
    with pytest.raises(Exception, match="return_last_state is not available under torch.compile"):
        torch.compile(scan, fullgraph=True, backend="aot_eager")(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backbone,routing,packed", CASES, ids=case_id)
def test_compiled_triton_block_equals_eager(backbone, routing, packed):
    _assert_compiled_equals_eager(backbone, routing, packed, "cuda", "triton", 64, {}, 1e-4)

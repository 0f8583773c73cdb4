"""torch.compile traces a block of every backbone in one graph (the kernel front doors as torch.library
operators), and the compiled block computes what the eager one does, forward and backward."""

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
]


def _assert_compiled_equals_eager(backbone, routing, packed, device, scan_backend, length, compile_options,
                                  tolerance):
    """``torch.compile(block, fullgraph=True)`` against the eager block: the output and every gradient."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = momkit.build_block({"modalities": ["text", "image"], "backbone": backbone,
                                "routing": {"specific": routing}, "scan_backend": scan_backend}).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, length, 16, generator=gen, device=device, requires_grad=True)
    modality = torch.randint(0, 2, (2, length), generator=gen, device=device)
    seq_idx = (torch.arange(length, device=device) >= length // 2 - 2).long().expand(2, length).contiguous() \
        if packed else None
    weight = torch.randn(2, length, 16, generator=gen, device=device)
    compiled = torch.compile(block, fullgraph=True, **compile_options)
    results = []
    for run in (compiled, block):
        y = run(x, modality, seq_idx)
        results.append((y, *torch.autograd.grad((y * weight).sum(), [x, *block.parameters()])))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("backbone,routing,packed", CASES, ids=lambda v: v["kind"] if isinstance(v, dict) else str(v))
def test_compiled_block_equals_eager(backbone, routing, packed):
    _assert_compiled_equals_eager(backbone, routing, packed, "cpu", "auto", 24, {"backend": "aot_eager"}, 1e-6)


def test_last_state_is_refused_under_compile():
    torch._dynamo.reset()

    def scan(u, delta, A, B, C):
        return momkit.ops.selective_scan(u, delta, A, B, C, return_last_state=True)

    args = (torch.randn(1, 4, 6), torch.rand(1, 4, 6), -torch.rand(4, 3), torch.randn(1, 3, 6), torch.randn(1, 3, 6))
    with pytest.raises(Exception, match="return_last_state is not available under torch.compile"):
        torch.compile(scan, fullgraph=True, backend="aot_eager")(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backbone,routing,packed", CASES, ids=lambda v: v["kind"] if isinstance(v, dict) else str(v))
def test_compiled_triton_block_equals_eager(backbone, routing, packed):
    _assert_compiled_equals_eager(backbone, routing, packed, "cuda", "triton", 64, {}, 1e-4)

"""Routed layers: each token sees only its own modality's weights, and gradient reaches only present ones."""

import pytest
import torch

from momkit.routing import CausalConv1d, Linear, RMSNorm

M = 3


def per_token(layer, x, modality):
    """The routed linear layer applied one token at a time with that token's modality's weights."""
    flat_x, flat_m = x.reshape(-1, x.shape[-1]), modality.reshape(-1)
    rows = []
    for xi, mi in zip(flat_x, flat_m):
        y = layer.weight[mi] @ xi
        if layer.bias is not None:
            y = y + layer.bias[mi]
        rows.append(y)
    return torch.stack(rows).view(*x.shape[:-1], -1)


def randomise(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


@pytest.fixture
def batch(gen):
    x = torch.randn(3, 11, 5, generator=gen, dtype=torch.float64)
    modality = torch.randint(0, M, (3, 11), generator=gen)
    return x, modality


def test_linear_matches_per_token(gen, batch):
    x, modality = batch
    layer = randomise(Linear(5, 7, n_modalities=M).double(), gen)
    torch.testing.assert_close(layer(x, modality), per_token(layer, x, modality), rtol=1e-12, atol=1e-12)


def test_linear_single_modality_batch(gen, batch):
    x, _ = batch
    layer = randomise(Linear(5, 7, n_modalities=M).double(), gen)
    only = torch.full(x.shape[:-1], 2)
    torch.testing.assert_close(layer(x, only), x @ layer.weight[2].T + layer.bias[2])


def test_shared_layers_ignore_modality(gen, batch):
    x, modality = batch
    for layer, weight_shape in ((Linear(5, 7), (7, 5)), (RMSNorm(5), (5,)), (CausalConv1d(5, 4), (5, 4))):
        layer = randomise(layer.double(), gen)
        assert layer.weight.shape == weight_shape
        torch.testing.assert_close(layer(x, modality), layer(x, torch.zeros_like(modality)), rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: Linear(5, 7, n_modalities=M), lambda: RMSNorm(5, n_modalities=M),
                                  lambda: CausalConv1d(5, 4, n_modalities=M)], ids=["linear", "norm", "conv"])
def test_no_leak_between_modalities(gen, batch, make):
    """Changing modality 1's weights changes no output at a position of another modality."""
    x, modality = batch
    layer = randomise(make().double(), gen)
    before = layer(x, modality)
    with torch.no_grad():
        for p in layer.parameters():
            p[1].add_(torch.randn(p[1].shape, generator=gen, dtype=p.dtype))
    after = layer(x, modality)
    other = modality != 1
    torch.testing.assert_close(after[other], before[other], rtol=0, atol=0)
    assert (after[~other] - before[~other]).abs().max() > 1e-3


@pytest.mark.parametrize("make", [lambda: Linear(5, 7, n_modalities=M), lambda: RMSNorm(5, n_modalities=M),
                                  lambda: CausalConv1d(5, 4, n_modalities=M)], ids=["linear", "norm", "conv"])
def test_absent_modality_gets_zero_gradient(gen, batch, make):
    x, modality = batch
    modality = modality.clamp(max=1)
    layer = randomise(make().double(), gen)
    (layer(x, modality) * torch.randn(x.shape[:-1] + (layer(x, modality).shape[-1],), generator=gen,
                                      dtype=x.dtype)).sum().backward()
    for p in layer.parameters():
        assert torch.equal(p.grad[2], torch.zeros_like(p.grad[2]))
        assert p.grad[0].abs().sum() > 0 and p.grad[1].abs().sum() > 0


def test_routed_conv_is_causal_and_matches_shared_per_modality(gen, batch):
    x, modality = batch
    routed = randomise(CausalConv1d(5, 4, n_modalities=M).double(), gen)
    y = routed(x, modality)
    for m in range(M):
        shared = CausalConv1d(5, 4).double()
        with torch.no_grad():
            shared.weight.copy_(routed.weight[m])
            shared.bias.copy_(routed.bias[m])
        mask = modality == m
        torch.testing.assert_close(y[mask], shared(x, modality)[mask])
    x2 = x.clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(routed(x2, modality)[:, :6], y[:, :6], rtol=0, atol=0)


@pytest.mark.parametrize("n_modalities", [None, M], ids=["shared", "routed"])
def test_conv_step_matches_forward(gen, batch, n_modalities):
    x, modality = batch
    conv = randomise(CausalConv1d(5, 4, n_modalities=n_modalities).double(), gen)
    y = conv(x, modality)
    conv_state = torch.zeros(x.shape[0], 5, 4, dtype=x.dtype)
    for t in range(x.shape[1]):
        torch.testing.assert_close(conv.step(x[:, t], conv_state, modality[:, t]), y[:, t])
        torch.testing.assert_close(conv_state[..., -1], x[:, t])


@pytest.mark.parametrize("n_modalities", [None, M], ids=["shared", "routed"])
def test_conv_respects_packed_documents(gen, batch, n_modalities):
    x, modality = batch
    conv = randomise(CausalConv1d(5, 4, n_modalities=n_modalities).double(), gen)
    seq_idx = torch.zeros(x.shape[:2], dtype=torch.int32)
    seq_idx[:, 4:] = 1
    seq_idx[:, 9:] = 2
    y = conv(x, modality, seq_idx)
    for start, end in ((0, 4), (4, 9), (9, 11)):
        torch.testing.assert_close(y[:, start:end], conv(x[:, start:end], modality[:, start:end]))


@pytest.mark.parametrize("n_modalities, packed", [(None, True), (M, False), (M, True)],
                         ids=["shared-packed", "routed", "routed-packed"])
def test_conv_returns_the_input_dtype_on_the_tap_path(gen, batch, n_modalities, packed):
    """Float32 weights on a bfloat16 input (autocast) give bfloat16, as the convolution kernel's path does, close
    to the float64 result; a float32 output here would run every scan after it in float32."""
    x, modality = batch
    conv = randomise(CausalConv1d(5, 4, n_modalities=n_modalities).double(), gen)
    seq_idx = torch.zeros(x.shape[:2], dtype=torch.int32)
    seq_idx[:, 5:] = 1
    seq_idx = seq_idx if packed else None
    expected = conv(x, modality, seq_idx)
    y = conv.float()(x.bfloat16(), modality, seq_idx)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)

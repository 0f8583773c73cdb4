"""The Triton routed linear layer against the per-token float64 product, forward and backward.

Two tiers. Small odd shapes run under Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` is set
(under a minute on two cores: ``TRITON_INTERPRET=1 pytest tests/kernels/test_triton_routed_linear.py``),
otherwise on a CUDA GPU. Larger shapes, each at several tilings, run only on a CUDA GPU: there the compiled
kernels are tested, not the interpreter's NumPy, and compilers have been seen to miscompile some block sizes
only. Without Triton, or with neither a GPU nor the interpreter, they skip.

Each comparison is ``|x - ref| / |ref|`` (Frobenius norms; ``|x|`` where ``ref`` is zero) of ``y``, ``dx``,
``dweight`` and ``dbias`` for a random linear loss of ``y``, against float64 on the same (rounded) inputs: at
most 1e-4 for float32 inputs, 1e-3 for float16 ones and 1e-2 for bfloat16 ones. The small tier's reference is
the per-token product with ``weight[modality]``; the large tier's sums, over the modalities, each modality's
dense product masked to its tokens (a per-token gather of a 2048 x 1024 weight would take tens of gigabytes).

Modality ids come random per token, in runs of a few tokens that cross tile boundaries, in long runs that fill
whole tiles, and with one modality absent, whose gradients must then be exactly zero.
"""

import pytest
import torch

from tests.kernels.conftest import DEVICE, TOLERANCE, as_float64, assert_close as assert_near

KERNELS = "momkit.kernels.triton.routed_linear"


def modalities(gen, n, m, runs=(1, 1), absent=None):
    """``(n,)`` int64 ids in ``0..m-1`` on ``DEVICE``: consecutive runs of ``runs[0]..runs[1]`` tokens, each of a
    random modality other than ``absent``."""
    choices = torch.tensor([i for i in range(m) if i != absent])
    lengths = torch.randint(runs[0], runs[1] + 1, (n,), generator=gen)
    ids = choices[torch.randint(0, len(choices), (n,), generator=gen)]
    return ids.repeat_interleave(lengths)[:n].to(DEVICE)


def make_inputs(gen, n, k, o, m, runs=(1, 1), absent=None, bias=True, dtype=torch.float32):
    """Random ``x (n, k)``, ``weight (m, o, k)``, ``bias (m, o)`` in ``dtype`` and ``modality (n,)``."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)

    return dict(x=randn(n, k), weight=randn(m, o, k) / k ** 0.5, bias=randn(m, o) if bias else None,
                modality=modalities(gen, n, m, runs, absent))


def per_token(x, weight, bias, modality):
    """``y_i = x_i W_{m_i}^T + b_{m_i}`` token by token."""
    y = torch.einsum("nk,nok->no", x, weight[modality])
    return y if bias is None else y + bias[modality]


def per_modality(x, weight, bias, modality):
    """The same, as each modality's dense product masked to its tokens, summed."""
    y = 0
    for m in range(weight.shape[0]):
        ym = x @ weight[m].T if bias is None else torch.addmm(bias[m], x, weight[m].T)
        y = y + (modality == m)[:, None] * ym
    return y


def run(fn, inputs, seed, loss_dtype=None, **extra):
    """``y`` and the gradients of ``x``, ``weight`` and ``bias`` for a random linear loss of ``y``.

    The loss weights are drawn in float64 and rounded to ``y``'s dtype, or first to ``loss_dtype``: a float64
    reference given a low-precision run's dtype differentiates that run's loss exactly.
    """
    names = [name for name in ("x", "weight", "bias") if inputs[name] is not None]
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in names}
    y = fn(**{**inputs, **leaves}, **extra)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w.to(y.device, loss_dtype or y.dtype).to(y.dtype)
    grads = torch.autograd.grad((y * w).sum(), list(leaves.values()))
    return {"y": y, **{f"d{name}": g for name, g in zip(names, grads)}}


def reference(inputs, seed, fn=per_token, loss_dtype=None):
    return run(fn, as_float64(inputs), seed, loss_dtype)


def assert_close(got, ref, dtype, label):
    for name, x in got.items():
        assert x.dtype == dtype, f"{label}: {name} is {x.dtype}, not {dtype}"
    assert_near(got, ref, dtype, label)


def assert_absent_zero(got, absent, label):
    if absent is not None:
        for name in ("dweight", "dbias"):
            if name in got:
                assert (got[name][absent] == 0).all(), f"{label}: {name} of absent modality {absent} is not zero"


SMALL = [
    dict(n=1, k=5, o=7, m=1),
    dict(n=37, k=21, o=19, m=2),
    dict(n=37, k=40, o=33, m=3, runs=(2, 7), bias=False),
    dict(n=130, k=23, o=45, m=3, runs=(2, 9), absent=1),
    dict(n=130, k=33, o=17, m=2, runs=(20, 40)),
    dict(n=130, k=18, o=35, m=3, absent=2, bias=False),
    dict(n=130, k=9, o=24, m=1, bias=False),
    dict(n=130, k=26, o=20, m=8, runs=(1, 12), absent=5),
    dict(n=2100, k=9, o=24, m=3, runs=(1, 700), absent=1),
]


def case_id(case):
    return "-".join(f"{k}{v[0]}_{v[1]}" if isinstance(v, tuple) else f"{k}{v}" for k, v in case.items())


def small_tilings(kernels):
    """A square tiling of the smallest blocks whose forward reads a transposed copy of the weight, and one whose
    blocks differ kernel to kernel and axis to axis and whose forward reads the weight in place."""
    return (kernels.Tiling(block_n=16, block_o=16, block_k=16, warps=2, stages=1,
                           dx_block_n=16, dx_block_k=16, dx_block_o=16, dx_warps=2, dx_stages=1,
                           dw_block_o=16, dw_block_k=16, dw_block_n=16, dw_warps=2, dw_stages=1, group=2,
                           copy_rows=0),
            kernels.Tiling(block_n=32, block_o=16, block_k=32, warps=4, stages=2,
                           dx_block_n=16, dx_block_k=32, dx_block_o=16, dx_warps=2, dx_stages=3,
                           dw_block_o=32, dw_block_k=16, dw_block_n=32, dw_warps=4, dw_stages=2, group=3))


@pytest.mark.parametrize("case", SMALL, ids=case_id)
def test_small_shapes_float32(kernels, gen, case):
    inputs = make_inputs(gen, **case)
    ref = reference(inputs, 7)
    for tiling in small_tilings(kernels):
        got = run(kernels.routed_linear, inputs, 7, tiling=tiling)
        assert_close(got, ref, torch.float32, f"{tiling}")
        assert_absent_zero(got, case.get("absent"), f"{tiling}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_shapes_16_bit(kernels, gen, dtype):
    inputs = make_inputs(gen, 130, 23, 45, 3, runs=(2, 9), absent=0, dtype=dtype)
    got = run(kernels.routed_linear, inputs, 3, tiling=small_tilings(kernels)[1])
    assert_close(got, reference(inputs, 3), dtype, str(dtype))
    assert_absent_zero(got, 0, str(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiles_of_one_modality_through_tensor_descriptors(kernels, gen, dtype, monkeypatch):
    """16-bit operands with 16-byte aligned rows load the tiles of one modality through tensor descriptors
    (two per kernel: forward, ``dx``, ``dweight``) from ``tma_rows`` tokens on, with tiles of mixed modalities,
    partial tiles and an absent modality beside them; with an ``order``, whose rows are gathered through pointers,
    only the weight's tiles (one descriptor per kernel: forward, ``dx``); the same shapes with ``tma=False``, with
    rows of 23 elements, below ``tma_rows``, or with a block wider than a bulk copy's box load through pointers
    alone. Every variant matches the float64 reference."""
    made = []
    real = kernels.TensorDescriptor

    class Counted(real):
        @staticmethod
        def from_tensor(tensor, block_shape, **options):
            made.append(tuple(block_shape))
            return real.from_tensor(tensor, block_shape, **options)

    monkeypatch.setattr(kernels, "TensorDescriptor", Counted)
    tiling = kernels.replace(small_tilings(kernels)[1], tma_rows=70)
    shapes = ((130, 24, 40, (20, 60), 6), (77, 16, 48, (3, 30), 6), (130, 23, 40, (20, 60), 0))
    for n, k, o, runs, descriptors in shapes:
        inputs = make_inputs(gen, n, k, o, 3, runs=runs, absent=0, dtype=dtype)
        ref = reference(inputs, 5)
        order = torch.argsort(inputs["modality"], stable=True)
        for variant, extra, expected in (("tma", dict(tiling=tiling), descriptors),
                                         ("pointers", dict(tiling=kernels.replace(tiling, tma=False)), 0),
                                         ("few", dict(tiling=kernels.replace(tiling, tma_rows=n + 1)), 0),
                                         ("wide", dict(tiling=kernels.replace(tiling, dx_block_k=512)), 0),
                                         ("order", dict(tiling=tiling, order=order), descriptors // 3)):
            made.clear()
            got = run(kernels.routed_linear, inputs, 5, **extra)
            label = f"n {n}, k {k}, o {o}, {variant}"
            assert len(made) == expected, f"{label}: {len(made)} tensor descriptors, not {expected}"
            assert_close(got, ref, dtype, label)
            assert_absent_zero(got, 0, label)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ids_in_no_order_through_an_order(kernels, gen, dtype):
    """Ids drawn per token (a router's expert choices) with ``order``: the stable argsort that groups them, and a
    random permutation that leaves every tile mixed; rows are read and written in place through it, forward
    and backward, and an absent id's gradients stay exactly zero."""
    inputs = make_inputs(gen, 130, 23, 45, 8, absent=5, dtype=dtype)
    ref = reference(inputs, 8)
    orders = {"argsort": torch.argsort(inputs["modality"], stable=True),
              "random": torch.randperm(130, generator=gen).to(DEVICE)}
    for tiling in small_tilings(kernels):
        for name, order in orders.items():
            got = run(kernels.routed_linear, inputs, 8, tiling=tiling, order=order)
            assert_close(got, ref, dtype, f"{name}, {tiling}")
            assert_absent_zero(got, 5, f"{name}, {tiling}")


def master_weights(gen, n, k, o, m, dtype, runs=(1, 1), fn=per_token):
    """Inputs with a 16-bit ``x`` and a float32 ``weight`` and ``bias``, the same inputs with the weight and bias
    rounded to ``dtype``, and the float64 reference of the rounded ones."""
    inputs = make_inputs(gen, n, k, o, m, runs=runs, absent=m - 1, dtype=dtype)
    for name in ("weight", "bias"):
        inputs[name] = (inputs[name].float() + 1e-3 * torch.randn(inputs[name].shape, generator=gen).to(DEVICE))
    rounded = {**inputs, "weight": inputs["weight"].to(dtype), "bias": inputs["bias"].to(dtype)}
    assert not torch.equal(rounded["weight"].float(), inputs["weight"])
    return inputs, rounded, reference(rounded, 6, fn, loss_dtype=dtype)


def assert_master_near(got, ref, dtype, label):
    """The run of master weights ``got`` against the float64 reference ``ref``: ``y`` and ``dx`` in ``dtype``,
    ``dweight`` and ``dbias`` in float32 at float32's tolerance, so never rounded to ``dtype`` on their way."""
    assert_close({k: got[k] for k in ("y", "dx")}, {k: ref[k] for k in ("y", "dx")}, dtype, label)
    assert_close({k: got[k] for k in ("dweight", "dbias")}, {k: ref[k] for k in ("dweight", "dbias")},
                 torch.float32, label)


def assert_master_close(got, same, ref, dtype, label):
    """:func:`assert_master_near`, and against the run of the rounded weights ``same``: ``y`` and ``dx`` the same
    bits, ``dweight`` and ``dbias`` those bits once rounded."""
    assert_master_near(got, ref, dtype, label)
    for name in ("y", "dx", "dweight", "dbias"):
        assert torch.equal(got[name].to(dtype), same[name]), f"{label}: {name} differs from the rounded weight's"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_master_weights(kernels, gen, dtype, monkeypatch):
    """A float32 weight and bias beside 16-bit tokens compute the products of the weight and bias rounded to the
    tokens' dtype, with their gradients in float32 straight from the float32 sums: through pointers (both small
    tilings), through an ``order``, through tensor descriptors, and one product per token. The weight is cast
    once per forward and backward: the forward's copy serves the backward too (one product per token reads it
    in place, and its backward casts it)."""
    casts = []
    real_to = torch.Tensor.to

    def counted_to(self, *args, **kwargs):
        if self.dtype == torch.float32 and self.dim() == 3:
            casts.append(self.shape)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted_to)
    in_place = small_tilings(kernels)[1]
    many, few = master_weights(gen, 130, 24, 40, 3, dtype, runs=(20, 60)), master_weights(gen, 3, 40, 33, 3, dtype)
    order = torch.argsort(many[0]["modality"], stable=True)
    for label, (inputs, rounded, ref), extra in (
            ("pointers", many, dict(tiling=small_tilings(kernels)[0])),
            ("pointers in place", many, dict(tiling=in_place)),
            ("order", many, dict(tiling=in_place, order=order)),
            ("tma", many, dict(tiling=kernels.replace(in_place, tma_rows=70))),
            ("one product per token", few, {})):
        casts.clear()
        got = run(kernels.routed_linear, inputs, 6, **extra)
        assert len(casts) == 1, f"{label}: {len(casts)} copies of the weight in {dtype}, not 1"
        assert_master_close(got, run(kernels.routed_linear, rounded, 6, **extra), ref, dtype, label)
        assert_absent_zero(got, 2, label)


@pytest.mark.parametrize("n", [130, 16, 3])
def test_default_tiling(kernels, gen, n):
    """The default tilings, that of a few tokens (decoding) included."""
    inputs = make_inputs(gen, n, 70, 300, 2, runs=(2, 90))
    assert_close(run(kernels.routed_linear, inputs, 9), reference(inputs, 9), torch.float32, "default tiling")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_tokens_take_one_product_per_token(kernels, gen, dtype):
    """Up to ``gemv_rows`` tokens, one matrix-vector product per token, at several of its tilings, and the token
    tiles that take over above it (``gemv_rows=0``), forward and backward."""
    default = kernels.default_tiling(dtype, 4)
    tilings = (default, kernels.replace(default, gemv_block_o=1, gemv_block_k=16, gemv_warps=1),
               kernels.replace(default, gemv_block_o=32, gemv_block_k=64, gemv_warps=8),
               kernels.replace(default, gemv_rows=0, block_n=16, block_o=16, block_k=16, warps=2, stages=1))
    for n, k, o, m in ((1, 300, 70, 2), (4, 40, 33, 3), (3, 9, 17, 2)):
        inputs = make_inputs(gen, n, k, o, m, dtype=dtype)
        ref = reference(inputs, 4)
        for tiling in tilings:
            assert_close(run(kernels.routed_linear, inputs, 4, tiling=tiling), ref, dtype, f"n {n}, {tiling}")


def test_few_tokens_at_any_address(kernels, gen):
    """One product per token with ``x``, the weight and the bias starting at addresses that are multiples of 16
    bytes and that are not, in turn, at the same shapes: on a GPU, launches that repeat reuse a compiled kernel, and
    one compiled for aligned rows must not take the others."""
    inputs = make_inputs(gen, 2, 64, 40, 2, dtype=torch.bfloat16)
    ref = per_token(**as_float64(inputs))
    for offset in (0, 1, 0, 3):
        moved = {}
        for name in ("x", "weight", "bias"):
            flat = torch.zeros(offset + inputs[name].numel(), dtype=torch.bfloat16, device=DEVICE)
            flat[offset:] = inputs[name].reshape(-1)
            moved[name] = flat[offset:].view(inputs[name].shape)
        with torch.no_grad():
            y = kernels.routed_linear(**{**inputs, **moved})
        assert_close({"y": y}, {"y": ref}, torch.bfloat16, f"offset {offset}")
    if DEVICE == "cuda":
        kept = [key for key in kernels._ROUTED_GEMV.compiled if (64, 40) in key]
        assert len(kept) == 2, f"one compiled kernel for aligned rows and one for the others, got {len(kept)}"


def test_partial_gradients(kernels, gen):
    """Only the gradients asked for are computed, and they match."""
    inputs = make_inputs(gen, 37, 21, 19, 2, runs=(3, 6))
    ref = reference(inputs, 5)
    tiling = small_tilings(kernels)[0]
    for frozen in (("weight", "bias"), ("x",), ("x", "weight")):
        leaves = {k: v.clone().requires_grad_(k not in frozen) for k, v in inputs.items() if k != "modality"}
        y = kernels.routed_linear(**leaves, modality=inputs["modality"], tiling=tiling)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        (y * w.to(y.device, y.dtype)).sum().backward()
        for name, leaf in leaves.items():
            if name in frozen:
                assert leaf.grad is None
            else:
                assert_close({f"d{name}": leaf.grad}, {f"d{name}": ref[f"d{name}"]}, torch.float32, f"{frozen}")


@pytest.mark.parametrize("n", [37, 1])
def test_forward_without_gradients(kernels, gen, n):
    """Without gradients to take (grad mode off, or no input requiring one), the kernels run without an autograd
    node, to the same result."""
    inputs = make_inputs(gen, n, 21, 19, 3, runs=(2, 5))
    tiling = small_tilings(kernels)[1]
    with torch.no_grad():
        y = kernels.routed_linear(**inputs, tiling=tiling)
    frozen = kernels.routed_linear(**inputs, tiling=tiling)
    leaf = inputs["weight"].clone().requires_grad_()
    tracked = kernels.routed_linear(**{**inputs, "weight": leaf}, tiling=tiling)
    assert y.grad_fn is None and frozen.grad_fn is None and tracked.grad_fn is not None
    ref = reference(inputs, 0)["y"]
    for name, got in (("no grad", y), ("no input requires grad", frozen), ("tracked", tracked.detach())):
        assert_close({"y": got}, {"y": ref}, torch.float32, name)


def listed_tiles(ids, n_ids, block):
    """Per id, the tiles of ``block`` tokens of ``ids`` that hold only it, then those that hold it among others,
    each in token order."""
    tiles = [set(ids[start:start + block].tolist()) for start in range(0, len(ids), block)]
    return [[t for t, held in enumerate(tiles) if held == {i}] + [t for t, held in enumerate(tiles)
                                                                  if i in held and len(held) > 1]
            for i in range(n_ids)]


@pytest.mark.parametrize("n, block, runs", [(1000, 16, (1, 1)), (4133, 64, (1, 90)), (4133, 32, (200, 900)),
                                            (1, 16, (1, 1)), (64, 64, (64, 64))])
def test_tile_lists(kernels, gen, n, block, runs):
    """The ``dweight`` kernel's tile lists, against Python's, for ids in runs shorter and longer than a tile (more
    tiles than one chunk of the kernel), sorted ids, one id absent, and a batch that is not a whole tile."""
    for ids in (modalities(gen, n, 8, runs, absent=3), torch.sort(modalities(gen, n, 8, runs)).values):
        tiles, counts = kernels._tile_lists(ids, 8, block)
        expected = listed_tiles(ids.cpu(), 8, block)
        got = [tiles[i, :counts[i, 1]].tolist() for i in range(8)]
        pure = [sum(len(set(ids[t * block:(t + 1) * block].tolist())) == 1 for t in listed) for listed in expected]
        assert tiles.shape == (8, -(-n // block)) and tiles.dtype == counts.dtype == torch.int32
        assert got == expected and counts[:, 0].tolist() == pure, f"n {n}, block {block}, runs {runs}"


def test_layers_of_the_same_ids_and_order_share_their_tile_lists(kernels, gen, monkeypatch):
    """Layers called with the same ``modality`` and ``order`` (the expert sublayers of a block; the projections of a
    MoM block, without an order) build the ids in their order and the tile lists once. An in-place change of
    either gives new ones, and inference tensors are not cached; every result matches float64."""
    made = []
    real = kernels._tile_lists
    monkeypatch.setattr(kernels, "_tile_lists", lambda *args: made.append(args[1:]) or real(*args))
    monkeypatch.setattr(kernels, "_GROUPINGS", {})
    tiling = small_tilings(kernels)[1]
    first = make_inputs(gen, 130, 23, 45, 8, absent=5)
    modality = first["modality"]
    layers = [first, {**make_inputs(gen, 130, 23, 45, 8), "modality": modality},
              {**make_inputs(gen, 130, 45, 23, 8, bias=False), "modality": modality}]
    for order in (None, torch.argsort(modality, stable=True)):
        made.clear()
        for index, inputs in enumerate(layers):
            got = run(kernels.routed_linear, inputs, index, tiling=tiling, order=order)
            assert_close(got, reference(inputs, index), torch.float32, f"layer {index}, order {order is not None}")
        assert made == [(8, tiling.dw_block_n)], f"order {order is not None}: tile lists built {len(made)} times"
    for changed_order in (False, True):
        changed = modalities(gen, 130, 8)
        modality.copy_(changed)
        if changed_order:
            order.copy_(torch.argsort(changed, stable=True))
        for index, inputs in enumerate(layers):
            got = run(kernels.routed_linear, inputs, index, tiling=tiling, order=order if changed_order else None)
            assert_close(got, reference({**inputs, "modality": changed}, index), torch.float32,
                         f"changed in place, order {changed_order}, layer {index}")
    assert len(made) == 3
    kept = len(kernels._GROUPINGS)
    with torch.inference_mode():
        ids = modality.clone()
        kernels.routed_linear(first["x"], first["weight"], first["bias"], ids, tiling=tiling,
                              order=torch.argsort(ids, stable=True))
    assert len(kernels._GROUPINGS) == kept


def test_no_tokens(kernels, gen):
    inputs = make_inputs(gen, 0, 21, 19, 2)
    got = run(kernels.routed_linear, inputs, 1)
    assert got["y"].shape == (0, 19) and got["dx"].shape == (0, 21)
    assert (got["dweight"] == 0).all() and (got["dbias"] == 0).all()
    assert got["dweight"].shape == (2, 19, 21) and got["dbias"].shape == (2, 19)


def test_refuses_float64(kernels, gen):
    inputs = make_inputs(gen, 8, 5, 7, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        kernels.routed_linear(**inputs)


def test_tiling_checks(kernels):
    with pytest.raises(ValueError, match="power of two"):
        kernels.Tiling(block_k=48)
    with pytest.raises(ValueError, match="at least 16"):
        kernels.Tiling(dw_block_n=8)
    with pytest.raises(ValueError, match="at least 1"):
        kernels.Tiling(group=0)
    with pytest.raises(ValueError, match="copy_rows must be at least 0"):
        kernels.Tiling(copy_rows=-1)
    with pytest.raises(ValueError, match="tma_rows must be at least 0"):
        kernels.Tiling(tma_rows=-1)
    with pytest.raises(ValueError, match="gemv_block_o must be a power of two"):
        kernels.Tiling(gemv_block_o=6)
    assert kernels.default_tiling(torch.float32) != kernels.default_tiling(torch.bfloat16) == kernels.Tiling()
    assert kernels.default_tiling(torch.bfloat16, kernels.FEW_ROWS).block_n == 16
    assert kernels.default_tiling(torch.bfloat16, kernels.FEW_ROWS + 1) == kernels.Tiling()


def with_triton():
    """The installed plugins' registry, in use, with the Triton backend registered."""
    import momkit.kernels.triton as plugin
    from importlib.metadata import entry_points

    from momkit.registry import Registry, use_registry

    registry = Registry.from_entry_points()
    if "momkit.kernels.triton" not in {ep.value for ep in entry_points(group="momkit")}:
        registry.register(plugin, distribution="momkit")
    return use_registry(registry)


def test_front_door(kernels, gen):
    from momkit import ops

    inputs = make_inputs(gen, 2 * 19, 21, 19, 3, runs=(2, 9))
    inputs["x"] = inputs["x"].view(2, 19, 21)
    inputs["modality"] = inputs["modality"].view(2, 19)
    with with_triton():
        y = ops.routed_linear(**inputs, backend="triton")
    ref = per_token(inputs["x"].double().view(-1, 21), inputs["weight"].double(), inputs["bias"].double(),
                    inputs["modality"].view(-1)).view(2, 19, 19)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= TOLERANCE[torch.float32]


def test_front_door_order(kernels, gen):
    """``order`` reaches a backend that takes it and is left out for one that does not; on the CPU, one that is
    not a permutation of the positions is refused, naming it."""
    from momkit import ops
    from momkit.errors import SpecError

    inputs = make_inputs(gen, 37, 21, 19, 4)
    order = torch.argsort(inputs["modality"], stable=True)
    ref = per_token(*(inputs[k].double() for k in ("x", "weight", "bias")), inputs["modality"])
    for backend in ("triton", "reference"):
        with with_triton():
            y = ops.routed_linear(**inputs, order=order, backend=backend)
        assert ((y.double() - ref).norm() / ref.norm()).item() <= TOLERANCE[torch.float32], backend
    ops.routed_linear(**inputs, order=order.int(), backend="reference")
    if DEVICE == "cpu":
        with pytest.raises(SpecError, match="order must be a permutation of 0..36"):
            ops.routed_linear(**inputs, order=torch.zeros_like(order), backend="reference")
    with pytest.raises(ValueError, match="order"):
        ops.routed_linear(**inputs, order=order[:-1], backend="reference")


def large_tilings(kernels, dtype):
    """The default tiling of ``dtype`` (whose forward reads the weight in place at these sizes) and smaller and
    asymmetric ones; the last 16-bit one reads a transposed copy."""
    if dtype == torch.float32:
        others = [kernels.Tiling(block_n=32, block_o=64, block_k=32, warps=4, stages=2,
                                 dx_block_n=64, dx_block_k=64, dx_block_o=16, dx_warps=2, dx_stages=2,
                                 dw_block_o=64, dw_block_k=64, dw_block_n=16, dw_warps=4, dw_stages=2, group=4)]
    else:
        others = [kernels.Tiling(block_n=64, block_o=128, block_k=64, warps=4, stages=4,
                                 dx_block_n=64, dx_block_k=128, dx_block_o=64, dx_warps=4, dx_stages=4,
                                 dw_block_o=64, dw_block_k=128, dw_block_n=32, dw_warps=4, dw_stages=4, group=1),
                  kernels.Tiling(block_n=128, block_o=128, block_k=32, warps=4, stages=5,
                                 dx_block_n=256, dx_block_k=128, dx_block_o=32, dx_warps=8, dx_stages=3,
                                 dw_block_o=256, dw_block_k=64, dw_block_n=64, dw_warps=8, dw_stages=3, group=16,
                                 copy_rows=0)]
    return [kernels.default_tiling(dtype), *others]


LARGE = [
    dict(n=4096 + 17, k=1024, o=2048, m=2, runs=(1024, 1024)),
    dict(n=4096 + 17, k=1024, o=2048, m=3, absent=1),
    dict(n=4096 + 17, k=1000, o=1500, m=3, runs=(50, 300), bias=False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", LARGE, ids=case_id)
def test_large_shapes(cuda_kernels, gen, case, dtype):
    inputs = make_inputs(gen, **case, dtype=dtype)
    ref = reference(inputs, 11, fn=per_modality)
    for tiling in large_tilings(cuda_kernels, dtype):
        got = run(cuda_kernels.routed_linear, inputs, 11, tiling=tiling)
        assert_close(got, ref, dtype, f"{tiling}")
        assert_absent_zero(got, case.get("absent"), f"{tiling}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_shapes_through_an_order(cuda_kernels, gen, dtype):
    """Eight ids drawn per token, one absent, grouped by their argsort: the experts' case."""
    inputs = make_inputs(gen, 4096 + 17, 1024, 2048, 8, absent=3, dtype=dtype)
    ref = reference(inputs, 12, fn=per_modality)
    order = torch.argsort(inputs["modality"], stable=True)
    for tiling in large_tilings(cuda_kernels, dtype):
        got = run(cuda_kernels.routed_linear, inputs, 12, tiling=tiling, order=order)
        assert_close(got, ref, dtype, f"{tiling}")
        assert_absent_zero(got, 3, f"{tiling}")


@pytest.mark.parametrize("through", ["order", "runs"])
def test_large_shapes_master_weights(cuda_kernels, gen, through):
    """Float32 weights beside bfloat16 tokens at the default tiling, through an order (the experts' case, tiles
    read in place) and in runs of one modality (through tensor descriptors on Hopper)."""
    runs = (1, 1) if through == "order" else (1024, 1024)
    inputs, _, ref = master_weights(gen, 4096 + 17, 1024, 2048, 8, torch.bfloat16, runs=runs, fn=per_modality)
    extra = {"order": torch.argsort(inputs["modality"], stable=True)} if through == "order" else {}
    assert_master_near(run(cuda_kernels.routed_linear, inputs, 6, **extra), ref, torch.bfloat16, through)


@pytest.mark.parametrize("bias", [False, True], ids=["grouped-gemm", "bias-kernels"])
def test_large_shapes_sorted_by_id(cuda_kernels, gen, bias, monkeypatch):
    """Tokens sorted by id with their groups' ends, one id absent, float32 master weights beside bfloat16 tokens:
    without a bias, on Hopper and later, through PyTorch's grouped GEMM, whose ``dweight`` is rounded to bfloat16 on
    its way to float32 (as ``F.linear``'s under autocast is); with a bias, through these kernels' runs."""
    inputs, rounded, _ = master_weights(gen, 4096 + 17, 1024, 2048, 8, torch.bfloat16, fn=per_modality)
    order = torch.argsort(inputs["modality"], stable=True)
    for given in (inputs, rounded):
        given.update(x=given["x"][order], modality=given["modality"][order], bias=given["bias"] if bias else None)
    ref = reference(rounded, 13, fn=per_modality, loss_dtype=torch.bfloat16)
    groups = torch.bincount(inputs["modality"], minlength=8).cumsum(0)
    calls = []
    real = cuda_kernels.GroupedGemmFn.apply
    monkeypatch.setattr(cuda_kernels.GroupedGemmFn, "apply", lambda *args: calls.append(1) or real(*args))
    got = run(cuda_kernels.routed_linear, inputs, 13, groups=groups)
    assert len(calls) == (not bias and torch.cuda.get_device_capability() >= (9, 0))
    assert got["dweight"].dtype == torch.float32
    assert_close({k: got[k] for k in ("y", "dx")}, {k: ref[k] for k in ("y", "dx")}, torch.bfloat16, "y, dx")
    assert_near({k: v for k, v in got.items() if k.startswith("dw") or k == "dbias"},
                {k: ref[k] for k in got if k.startswith("dw") or k == "dbias"}, torch.bfloat16, "dweight")
    assert_absent_zero(got, 7, "sorted")


def test_no_host_synchronisation(cuda_kernels, gen):
    """Forward and backward make no call that waits for the device (CUDA's sync debug mode raises on one)."""
    inputs = make_inputs(gen, 4096 + 17, 1024, 2048, 3, runs=(1, 40), dtype=torch.bfloat16)
    run(cuda_kernels.routed_linear, inputs, 2)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k != "modality"}
    dy = torch.randn(inputs["x"].shape[0], 2048, generator=gen).to(DEVICE, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = cuda_kernels.routed_linear(**leaves, modality=inputs["modality"])
        torch.autograd.grad(y, list(leaves.values()), dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")

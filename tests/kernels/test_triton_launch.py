"""The launcher of repeating Triton launches: which calls reuse a compiled kernel and what it passes to it.

A stand-in kernel records its JIT launches (which compile) and the direct launches of what they returned, so
these run without a GPU. Whether the compiled kernels compute the right thing through the direct path is tested
with the kernels themselves on a GPU (``test_decode.py`` and ``test_triton_routed_linear.py``, including rows at
addresses that are not multiples of 16 bytes).
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
launch = pytest.importorskip("momkit.kernels.triton.launch")

STREAM = 77


class Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class Kernel:
    """Runtime arguments ``x, n``; constexprs ``FLAG, BLOCK``."""

    arg_names = ["x", "n", "FLAG", "BLOCK"]

    def __init__(self):
        self.compiled = []

    def __getitem__(self, grid):
        def jit_launch(*args, **options):
            self.compiled.append((grid, args, options, Compiled()))
            return self.compiled[-1][-1]
        return jit_launch


@pytest.fixture
def direct(monkeypatch):
    """Launchers of stand-in kernels that take the direct path, with device 0's stream ``STREAM``."""
    monkeypatch.setattr(launch, "_hooked", lambda: False)
    monkeypatch.setattr(launch, "_driver", lambda: (lambda: 0, lambda device: STREAM))

    def make(kernel):
        launcher = launch.Launcher(kernel, pointers=1)
        launcher.direct = True
        return launcher
    return make


def test_a_repeated_call_launches_the_compiled_kernel(direct):
    kernel = Kernel()
    launcher = direct(kernel)
    x = torch.randn(64)
    launcher((2, 3), x, 5, BLOCK=16, FLAG=True, num_warps=4)
    assert len(kernel.compiled) == 1
    grid, args, options, compiled = kernel.compiled[0]
    assert (grid, args, options) == ((2, 3), (x, 5), dict(BLOCK=16, FLAG=True, num_warps=4))
    assert compiled.launches == []
    launcher((2, 3), x, 5, BLOCK=16, FLAG=True, num_warps=4)
    launcher((9,), x.clone(), 5, BLOCK=16, FLAG=True, num_warps=4)
    assert len(kernel.compiled) == 1
    assert [launched[:9] for launched in compiled.launches] == [
        (2, 3, 1, STREAM, "function", "metadata", None, None, None),
        (9, 1, 1, STREAM, "function", "metadata", None, None, None)]
    assert compiled.launches[0][9] is x
    assert [launched[10:] for launched in compiled.launches] == [(5, True, 16)] * 2, "constexprs in the kernel's order"


def test_what_triton_specialises_on_compiles_again(direct):
    kernel = Kernel()
    launcher = direct(kernel)
    storage = torch.randn(64)
    base = dict(BLOCK=16, FLAG=True, num_warps=4)
    calls = [((storage, 5), base),
             ((storage[1:], 5), base),
             ((storage.half(), 5), base),
             ((storage, 6), base),
             ((storage, 5), {**base, "num_warps": 8}),
             ((storage, 5), {**base, "num_stages": 3}),
             ((storage, 5), {**base, "num_stages": 4}),
             ((storage, 5), {**base, "BLOCK": 32}),
             ((None, 5), base)]
    for args, options in calls + calls:
        launcher((1,), *args, **options)
    assert len(kernel.compiled) == len(calls)
    assert [len(compiled.launches) for *_, compiled in kernel.compiled] == [1] * len(calls)
    assert [options.get("num_stages") for _, _, options, _ in kernel.compiled] == [None] * 5 + [3, 4, None, None]


def test_a_full_cache_starts_over(direct):
    kernel = Kernel()
    launcher = direct(kernel)
    x = torch.randn(4)
    for n in range(launch.MOST_KEYS + 1):
        launcher((1,), x, n, BLOCK=16, FLAG=False, num_warps=4)
    assert len(launcher.compiled) == 1


def test_constexprs_must_be_named_exactly(direct):
    launcher = direct(Kernel())
    with pytest.raises(TypeError, match=r"exactly the constexprs \['FLAG', 'BLOCK'\]"):
        launcher((1,), torch.randn(4), 5, BLOCK=16, num_warps=4)


def test_descriptors_are_keyed_by_what_triton_compiles_them_by(direct):
    """A tensor descriptor compiles by its base's dtype, its block shape and its padding; its shape, strides and
    address are runtime values. The compiled kernel gets the descriptor itself (its launch function encodes it)."""
    TensorDescriptor = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    kernel = Kernel()
    launcher = direct(kernel)
    storage = torch.randn(128, 64)

    class Subclass(TensorDescriptor):
        pass

    alike = [TensorDescriptor.from_tensor(storage, [16, 32]), TensorDescriptor.from_tensor(storage[:64], [16, 32]),
             TensorDescriptor.from_tensor(torch.randn(256, 32), [16, 32]),
             Subclass(storage, storage.shape, storage.stride(), [16, 32])]
    unlike = [TensorDescriptor.from_tensor(storage, [32, 32]), TensorDescriptor.from_tensor(storage.half(), [16, 32]),
              TensorDescriptor.from_tensor(storage, [16, 32], padding="nan")]
    for desc in alike + unlike + alike + unlike:
        launcher((1,), desc, 5, BLOCK=16, FLAG=True, num_warps=4)
    assert len(kernel.compiled) == 1 + len(unlike)
    assert [len(compiled.launches) for *_, compiled in kernel.compiled] == [2 * len(alike) - 1, 1, 1, 1]
    passed = [launched[9] for launched in kernel.compiled[0][-1].launches]
    assert len(passed) == 2 * len(alike) - 1 and all(a is b for a, b in zip(passed, alike[1:] + alike))


def test_pointers_come_first(direct):
    launcher = direct(Kernel())
    x = torch.randn(4)
    for args in ((5, x), (x, x)):
        with pytest.raises(TypeError, match=r"first 1 runtime arguments \['x'\] must be tensors, tensor descriptors "
                                            r"or None"):
            launcher((1,), *args, BLOCK=16, FLAG=True, num_warps=4)


def test_without_the_direct_path_every_call_is_a_jit_launch(direct, monkeypatch):
    kernel = Kernel()
    launcher = direct(kernel)
    monkeypatch.setattr(launch, "_hooked", lambda: True)
    for _ in range(2):
        launcher((1,), torch.randn(4), 5, BLOCK=16, FLAG=False, num_warps=4)
    launcher.direct = False
    monkeypatch.setattr(launch, "_hooked", lambda: False)
    launcher((1,), torch.randn(4), 5, BLOCK=16, FLAG=False, num_warps=4)
    assert len(kernel.compiled) == 3 and not launcher.compiled


def test_when_the_direct_path_is_taken(monkeypatch):
    """Only for kernels Triton compiles (not the interpreter's), and not while a profiler's launch hook is set."""
    assert not launch.Launcher(Kernel(), pointers=1).direct
    kernels = pytest.importorskip("momkit.kernels.triton.routed_linear")
    knobs = getattr(triton, "knobs", None)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    assert launch.Launcher(kernels._routed_gemv_kernel, pointers=5).direct == (knobs is not None and not interpreting)
    if knobs is None:
        return
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", None)
    assert not launch._hooked()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)
    assert launch._hooked()
    chain = type("Chain", (), {"calls": []})()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain)
    assert not launch._hooked(), "an empty chain of hooks is no hook"
    chain.calls.append(lambda metadata: None)
    assert launch._hooked()

"""Launches of small Triton kernels that repeat, without the JIT launcher's work on every call.

A decoding step launches a few kernels per layer on a few thousand elements each, so the host's time per launch
is the step's time; a training step whose layers are small (eight experts sharing a batch) is bound by the host
too. Triton's launcher (``kernel[grid](...)``) binds and specialises every argument, builds a
cache key and looks the compiled kernel up on every call, which takes about as long as the rest of a launch.
:class:`Launcher` keeps the compiled kernel of each specialisation under a key of its own: a tensor's dtype and
whether its address is a multiple of 16 bytes (what Triton specialises a pointer on), and the exact value of every
other argument and of the options (``None``, ints, floats, bools, constexprs, ``num_warps``), which fixes
whatever Triton specialises them on. The first call of a key goes through the JIT launcher, which compiles; later
calls pass the arguments straight to the compiled kernel's launch function on the current stream. A host tensor
descriptor (``triton.tools.tensor_descriptor.TensorDescriptor``, Hopper's bulk tensor copies) is keyed by its
base's dtype, its block shape and its padding, what Triton compiles it by (``tensordesc<bf16[64, 128]>``: its
shape and strides are runtime values); the compiled kernel's launch function encodes it on every call, as Triton's
launcher does.

It takes the JIT launcher's path every time for a kernel the interpreter runs (``TRITON_INTERPRET=1``), with a
Triton that has no ``triton.knobs`` (before 3.4; the direct path follows the launch of Triton 3.6 to 3.9), and
while a launch hook is set (a profiler's, which wants the launch metadata that the direct path does not build).
Not for kernels with other arguments that are neither tensors, descriptors nor plain values: their keys would not
tell specialisations apart.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.runtime.jit import JITFunction

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
    _DESCRIPTORS = (TensorDescriptor,)
except ImportError:
    _DESCRIPTORS = ()

MOST_KEYS = 256


def _hooked() -> bool:
    """Whether a launch hook is set. Triton 3.4 and later keep them in ``triton.knobs``: a function or ``None``,
    or (later versions) a chain of functions that is empty unless a profiler added one."""
    runtime = triton.knobs.runtime
    return any(hook is not None and bool(getattr(hook, "calls", True))
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


@functools.cache
def _driver():
    """The active driver's current-device and current-stream functions (the ones Triton's launcher calls)."""
    active = triton.runtime.driver.active
    return active.get_current_device, active.get_current_stream


def _is_pointer(a) -> bool:
    """Whether ``a`` may come among a launcher's first arguments: a tensor, a tensor descriptor or ``None``."""
    return a is None or isinstance(a, (torch.Tensor, *_DESCRIPTORS))


class Launcher:
    """``launcher(grid, *args, num_warps=w, num_stages=s, **constexprs)`` launches ``kernel`` as
    ``kernel[grid](*args, num_warps=w, num_stages=s, **constexprs)`` does (``num_stages`` optional); ``args`` are
    the kernel's runtime arguments in order, of which the first ``pointers`` are tensors, tensor descriptors or
    ``None`` and the rest plain values, and ``constexprs`` all the rest, by name (the key is built in a few
    microseconds for a launch of 48 arguments). A call site passes each argument with the same type every time:
    values that compare equal share a key, as ``1`` and ``True`` do, though Triton compiles an int and a bool
    differently. Keeps at most :data:`MOST_KEYS` compiled kernels (then starts over)."""

    def __init__(self, kernel, pointers: int):
        self.kernel, self.pointers = kernel, pointers
        self.direct = isinstance(kernel, JITFunction) and hasattr(triton, "knobs")
        self.compiled: dict = {}

    def __call__(self, grid: tuple[int, ...], *args, num_warps: int, num_stages: int | None = None,
                 **constexprs) -> None:
        options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps,
                                                                        "num_stages": num_stages}
        if not self.direct or _hooked():
            self.kernel[grid](*args, **options, **constexprs)
            return
        current_device, current_stream = _driver()
        device = current_device()
        n = self.pointers
        try:
            key = (device, num_warps, num_stages, args[n:],
                   *[None if a is None else (a.base.dtype, tuple(a.block_shape), a.padding)
                     if isinstance(a, _DESCRIPTORS) else (a.dtype, a.data_ptr() % 16 == 0) for a in args[:n]],
                   *constexprs.items())
        except AttributeError:
            self._check(args)
            raise
        found = self.compiled.get(key)
        if found is None:
            self._compile(key, grid, args, options, constexprs)
            return
        compiled, tail = found
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *tail)

    def _check(self, args) -> None:
        """Refuse runtime arguments of which the first ``pointers`` are not all tensors, descriptors or ``None``,
        or the others hold a tensor or a descriptor (whose key would be its identity, not what Triton specialises
        on)."""
        n = self.pointers
        if not all(_is_pointer(a) for a in args[:n]) or any(_is_pointer(a) and a is not None for a in args[n:]):
            raise TypeError(f"{self.kernel}: its first {n} runtime arguments {self.kernel.arg_names[:n]} must be "
                            f"tensors, tensor descriptors or None and the others neither, got "
                            f"{[type(a).__name__ for a in args]}")

    def _compile(self, key, grid, args, options, constexprs) -> None:
        """Launch through the JIT launcher and keep what it compiled, with the constexprs in the kernel's order."""
        self._check(args)
        names = self.kernel.arg_names[len(args):]
        if sorted(names) != sorted(constexprs):
            raise TypeError(f"{self.kernel}: pass the runtime arguments {self.kernel.arg_names[:len(args)]} "
                            f"in order and exactly the constexprs {names} by name, got {sorted(constexprs)}")
        compiled = self.kernel[grid](*args, **options, **constexprs)
        if len(self.compiled) >= MOST_KEYS:
            self.compiled.clear()
        self.compiled[key] = compiled, tuple(constexprs[name] for name in names)

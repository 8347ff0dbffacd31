"""Launching a Triton kernel with a fraction of the host time of ``kernel[grid](...)``.

``kernel[grid](*args, **meta)`` binds every argument, derives Triton's specialization of each
(dtype, 16-byte alignment of pointers, integers equal to 1 or divisible by 16) and hashes it all
into a cache key before it launches: tens of microseconds of Python per call, which an eager
forward of ~200 launches pays on every layer (a CUDA graph does not). :class:`Launcher` keys the
compiled kernel on a cheaper, at least as fine tuple of the same properties and then launches it
through the compiled kernel's own launcher (``CompiledKernel[grid](*args)``, Triton's API). The
first call of each key goes through ``kernel[grid]`` (compiling as usual), so the specialization
Triton picks is always its own; a finer key only means more entries pointing at the same kernel.

In Triton's interpreter (``TRITON_INTERPRET=1``) the call goes to ``kernel[grid]`` as is.
"""
import inspect
from typing import Any, Dict, Sequence

import torch

from flashcore import INTERPRET


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (``triton.cdiv`` costs microseconds per call on a launch path)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length()


def _specialization(values: list, constexpr: list) -> tuple:
    """What Triton may specialize the launch arguments on (or more): a constexpr's value; a tensor's
    dtype and 16-byte alignment; an integer's equality to 1, divisibility by 16 and width. One
    comprehension, no call per argument: this runs on every launch."""
    return tuple([
        v if c else
        (v.dtype, not v.data_ptr() & 15) if isinstance(v, torch.Tensor) else
        (v == 1, not v & 15, -0x80000000 <= v <= 0x7FFFFFFF, v >= 1 << 63) if type(v) is int else
        v if isinstance(v, bool) or v is None else type(v)
        for v, c in zip(values, constexpr)])


class Launcher:
    """``Launcher(kernel)(grid, *args, num_warps=..., num_stages=..., **constexprs)`` launches
    ``kernel`` as ``kernel[grid](*args, num_warps=..., num_stages=..., **constexprs)`` does."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = [] if INTERPRET else kernel.params  # the interpreter's functions have no parameter list
        self.names = [p.name for p in params]
        self.constexpr = [p.is_constexpr for p in params]
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.compiled: Dict[tuple, Any] = {}

    def __call__(self, grid: Sequence[int], *args, num_warps: int = 4, num_stages: int = 3, **constexprs) -> None:
        if INTERPRET:
            self.kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        values = list(args)
        for name in self.names[len(args):]:
            values.append(constexprs[name] if name in constexprs else self.defaults[name])
        device = torch._C._cuda_getDevice()
        key = (num_warps, num_stages, device, _specialization(values, self.constexpr))
        compiled = self.compiled.get(key)
        if compiled is None:  # compile (or find Triton's cached kernel) and launch, the usual way
            self.compiled[key] = self.kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        # the current stream's handle, as torch.cuda.current_stream().cuda_stream but without building a Stream
        stream = torch._C._cuda_getCurrentRawStream(device)
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*values, stream=stream)

"""Launching a Triton kernel again without Triton binding its arguments again.

``kernel[grid](*args, **constexprs)`` reads and specializes every argument in Python on each call
(dtypes, 16-byte alignment of pointers, integers equal to 1 or divisible by 16), then looks the
compiled kernel up: 15-40 us of host time per launch of the attention kernels on the H200's host
(2026-12-01), most of an eager attention call. A :class:`Launch` belongs to one launch site whose
specialization its owner keeps fixed (same dtypes, same non-tensor values, same pointer alignment:
flashcore keys its plans on exactly these). Its first call goes through Triton and keeps the
compiled kernel that Triton returns; later calls launch that kernel directly, as the last step of
Triton's own launch does (``CompiledKernel[grid](*every_argument)``).
"""
import functools
from typing import Optional, Tuple

import torch
from triton import knobs
from triton.runtime import driver

from flashcore import INTERPRET


def current_stream() -> Optional[int]:
    """The raw handle of the current CUDA stream (None under the interpreter): what a launch runs on."""
    if INTERPRET:
        return None
    return driver.active.get_current_stream(driver.active.get_current_device())


def dependent_launch_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can launch as programmatic dependents (``launch_pdl``): a CUDA
    GPU of compute capability 9.0 (Hopper) or later, compiled, not under Triton's interpreter."""
    return not INTERPRET and device.type == "cuda" and compute_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def compute_capability(device: torch.device) -> tuple:
    """A CUDA device's (major, minor), asked once per device: eager GEMVs and each 8-bit matmul of a
    prefill ask."""
    return torch.cuda.get_device_capability(device)


def _no_launch_hooks() -> bool:
    """No launch hooks (a profiler's) are set: Triton would pass them no launch metadata either."""
    runtime = knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return ((enter is None or getattr(enter, "calls", None) == [])
            and (exit_ is None or getattr(exit_, "calls", None) == []))


class Launch:
    """``Launch(kernel, num_warps=..., num_stages=..., maxnreg=..., launch_pdl=..., **constexprs)(grid, *args)``
    runs ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=..., maxnreg=..., launch_pdl=...)``
    (the options given; ``launch_pdl=True``: a programmatic dependent launch, for a kernel that
    waits for the grid before it, ``gdc_wait``, before it touches memory); grid is (x, y, z). A
    caller that launches several kernels may pass ``stream=current_stream()``, looked up once.
    A caller that has read the leading tensor arguments' ``data_ptr()`` passes them as
    ``pointers``: launches of the compiled kernel pass those integers in the tensors' place, which
    Triton's launcher takes as they are (for a tensor it calls ``data_ptr()`` and asks the driver
    whether the pointer is a device pointer: ~0.25 us per pointer on the H200's host, 2026-12-02).

    The caller guarantees that every call passes arguments of the same specialization as the
    first: the same dtypes, the same non-tensor values, the same 16-byte alignment of each pointer.
    Under Triton's interpreter every call goes through Triton.
    """

    __slots__ = ("kernel", "constexprs", "options", "compiled", "constexpr_values")

    def __init__(self, kernel, *, num_warps: int, num_stages: Optional[int] = None, maxnreg: Optional[int] = None,
                 launch_pdl: bool = False, **constexprs):
        self.kernel = kernel
        self.constexprs = constexprs
        self.options = {"num_warps": num_warps}
        if num_stages is not None:
            self.options["num_stages"] = num_stages
        if maxnreg is not None:  # registers per thread at launch (warp-specialized kernels move them)
            self.options["maxnreg"] = maxnreg
        if launch_pdl:
            self.options["launch_pdl"] = True
        self.compiled = None
        self.constexpr_values: Tuple = ()

    def __call__(self, grid: Tuple[int, int, int], *args, stream: Optional[int] = None,
                 pointers: Optional[Tuple[int, ...]] = None) -> None:
        compiled = self.compiled
        if compiled is None:
            self._first_call(grid, args)
        elif _no_launch_hooks():
            # What CompiledKernel[grid](*args) does (triton 3.4-3.9), less building the launch
            # metadata that only hooks read: ~5 us of host time less per launch on the H200's host.
            if stream is None:
                stream = current_stream()
            if pointers is not None:
                args = (*pointers, *args[len(pointers):])
            compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None,
                         None, None, *args, *self.constexpr_values)
        else:
            compiled[grid](*args, *self.constexpr_values)

    def _first_call(self, grid, args) -> None:
        compiled = self.kernel[grid](*args, **self.constexprs, **self.options)
        if INTERPRET or not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
            return
        # The compiled kernel takes every parameter in order; in flashcore's kernels the
        # constexprs follow the positional arguments. A Gluon kernel may take a launch option
        # (num_warps) as a constexpr parameter too: Triton binds the option's value to it.
        names = [p.name for p in self.kernel.params[len(args):]]
        values = {**self.options, **self.constexprs}
        if not set(self.constexprs) <= set(names) or not set(names) <= set(values):
            return
        self.constexpr_values = tuple(values[name] for name in names)
        self.compiled = compiled

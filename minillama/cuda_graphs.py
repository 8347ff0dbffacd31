"""CUDA graphs for the decode step: capture once per (batch, cache), replay once per token.

``DecodeGraphs(forward)`` is callable with ``Transformer.forward``'s signature, so the generate
loop takes it as its ``forward=``. Single-token steps on CUDA (tokens (B, 1), no ``logits_at``)
replay a graph of ``forward``; everything else (prefill) runs ``forward`` eagerly.

A graph bakes in the addresses of the cache tensors and of its own input/output buffers, and
nothing else: positions and fill lengths are read on the device from ``seq_lens``, which the
generate loop advances in place (``KVCache.advance``), and flashcore's launch grid depends on
shapes only. So one graph serves every token of a request, and it is looked up again by the
cache's addresses: a new cache allocated where a freed one was (the caching allocator's usual
choice) reuses its graph. The capacity check runs before each replay on the host copy of the
fill lengths, as flashcore would run it (inside a graph it cannot).
"""
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch


class _Graph:
    def __init__(self, forward: Callable, tokens: torch.Tensor, k_cache, v_cache, seq_lens, pool):
        self.tokens = tokens.clone()  # static input (B, 1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Warm-up outside the graph: Triton compiles and autotunes, cuBLAS picks its kernels.
            # It writes this step's k/v at the fill position, which the replay writes again.
            for _ in range(2):
                forward(self.tokens, k_cache, v_cache, seq_lens)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = forward(self.tokens, k_cache, v_cache, seq_lens)  # static output (B, 1, V)

    def replay(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """Replays captured decode steps of ``forward`` (a ``Transformer`` or ``FusedTransformer``).

    Args:
        forward: callable with ``Transformer.forward``'s signature; graph-safe on single tokens.
        max_graphs: graphs kept, least recently used dropped first (each holds its buffers).

    The returned logits tensor is the graph's output buffer: the next replay overwrites it.
    """

    def __init__(self, forward: Callable, max_graphs: int = 4):
        self.forward = forward
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[tuple, _Graph]" = OrderedDict()
        self._pool = None

    @torch.inference_mode()
    def __call__(
        self,
        tokens: torch.Tensor,
        k_cache: Optional[torch.Tensor] = None,
        v_cache: Optional[torch.Tensor] = None,
        seq_lens: Optional[torch.Tensor] = None,
        *,
        seq_lens_cpu: Optional[Sequence[int]] = None,
        logits_at: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if (tokens.device.type != "cuda" or tokens.shape[1] != 1 or logits_at is not None
                or k_cache is None or seq_lens_cpu is None):
            return self.forward(tokens, k_cache, v_cache, seq_lens, seq_lens_cpu=seq_lens_cpu, logits_at=logits_at)
        capacity = k_cache.shape[2]
        for b, n in enumerate(seq_lens_cpu):
            if n + 1 > capacity:
                raise ValueError(
                    f"row {b}: {n} cached + 1 new token = {n + 1} exceeds the cache capacity S_max={capacity}; "
                    f"allocate a larger cache"
                )
        return self.graph_for(tokens, k_cache, v_cache, seq_lens).replay(tokens)

    def graph_for(self, tokens, k_cache, v_cache, seq_lens) -> _Graph:
        """The graph for this batch and cache, captured now if there is none."""
        key = (tuple(tokens.shape), tokens.dtype, tuple(k_cache.shape), k_cache.dtype,
               k_cache.data_ptr(), v_cache.data_ptr(), seq_lens.data_ptr(), tokens.device)
        graph = self._graphs.get(key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = _Graph(self.forward, tokens, k_cache, v_cache, seq_lens, self._pool)
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return graph

    def clear(self) -> None:
        """Drop every graph (and the memory their buffers hold)."""
        self._graphs.clear()
        self._pool = None

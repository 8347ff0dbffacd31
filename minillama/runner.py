"""The runner: one per model and process. It runs the model's one forward, eagerly or as CUDA-graph
replays, and tunes the Triton GEMV once per GPU. Two kinds of step are replayed as graphs: decode
steps (one token on each of the first B rows) and packed steps (``forward_packed``: each row its own
count of new tokens, e.g. a continuous-batching step's decoding rows with prompt chunks; prefills
whose token bucket recurs run as packed steps too).

A graph bakes in the addresses of the cache tensors and of its own input/output buffers, and
nothing else: positions and fill lengths are read on the device from ``seq_lens``, which the
caller advances in place (``KVCache.advance``), and flashcore's launch grid depends on shapes
only. So one graph serves every token of a request, looked up again by the cache's addresses: a
new cache allocated where a freed one was (the caching allocator's usual choice) reuses its graph.

Packed steps: the graph's inputs are the token ids and one int64 buffer of metadata (positions,
flashcore's varlen tiles, the rows whose logits are wanted), copied in before each replay; a step
of T tokens runs the graph of the next token bucket (:func:`packed_bucket`), whose tiles past the
step's have length 0 and whose padding tokens nothing reads. A bucket is captured when it recurs
over the same cache (or up front, :meth:`Runner.capture_packed`): a shape seen once runs eagerly.

Batch buckets: a decode step of B rows over a cache of more rows runs the graph of the next
bucket size (1, 2, 4, 8, 16, 32, 64, then multiples of 64) that the cache can hold, over its first
rows; the extra rows compute values nobody reads and write only at their own fill position, which
lies past their fill. So a scheduler whose active rows come first needs few graphs.
"""
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch

import flashcore
from minillama.backend import NormedRows, Rope
from minillama.kv_cache import KVCache
from minillama.model import Transformer


def bucket(batch: int) -> int:
    """The graph batch size that serves ``batch`` rows."""
    if batch <= 64:
        return 1 << (batch - 1).bit_length()
    return -(-batch // 64) * 64


def packed_bucket(tokens: int) -> int:
    """The token count of the packed-step graph that serves ``tokens`` tokens: 16, 32, 64, 128,
    then multiples of 64."""
    if tokens <= 128:
        return max(16, 1 << (tokens - 1).bit_length())
    return -(-tokens // 64) * 64


def packed_capacity(tokens: int, rows: int, scored: bool = False) -> Tuple[int, int]:
    """(tiles, logits rows) that a packed graph of ``tokens`` tokens over a cache of ``rows`` rows
    holds: each row's tokens cut into tiles of ``VARLEN_TILE`` (one partial tile per row at most),
    one logits row per cache row at most (each samples once), or, ``scored``, one per token (a step
    that scores prompt tokens wants the logits of each)."""
    return min(tokens, tokens // flashcore.VARLEN_TILE + rows), tokens if scored else min(tokens, rows)


class _Graph:
    """One captured decode step over a fixed cache view."""

    def __init__(self, model: Transformer, tokens: torch.Tensor, cache: KVCache, pool):
        self.tokens = tokens.clone()  # static input (B, 1)
        self.cache_ptrs = (cache.v.data_ptr(), cache.seq_lens.data_ptr())  # besides k's, in the key
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Warm-up outside the graph: Triton compiles, cuBLAS picks its kernels. It writes this
            # step's k/v at the fill position, which the replay writes again.
            for _ in range(2):
                model(self.tokens, cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model(self.tokens, cache)  # static output (B, 1, V)

    def replay(self, tokens: torch.Tensor) -> torch.Tensor:
        (self.tokens if tokens.shape[0] == self.tokens.shape[0] else self.tokens[: tokens.shape[0]]).copy_(tokens)
        self.graph.replay()
        return self.logits


class _PackedGraph:
    """One captured packed step of ``tokens`` tokens over a fixed cache. With ``logits_out`` (a
    scored step's graph: a logits row for every token), the logits go to its first rows, a buffer
    that every scored graph shares, instead of a buffer of the graph's own."""

    def __init__(self, model: Transformer, cache: KVCache, tokens: int, pool,
                 logits_out: Optional[torch.Tensor] = None):
        n_tiles, n_logits = packed_capacity(tokens, cache.batch, scored=logits_out is not None)
        device = cache.k.device
        self.tokens = torch.zeros(tokens, dtype=torch.long, device=device)  # static inputs
        self.meta = torch.zeros(tokens + 4 * n_tiles + n_logits, dtype=torch.long, device=device)
        positions, tiles, rows = self.meta.split([tokens, 4 * n_tiles, n_logits])
        args = (self.tokens, positions, tiles.view(n_tiles, 4), cache, rows)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph; every tile has length 0: nothing is written
                model.forward_packed(*args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            logits = model.forward_packed(*args)  # static output (n_logits, V)
            if logits_out is not None:  # the graph's own logits are freed for the pool's later captures
                logits = logits_out[:n_logits].copy_(logits)
        self.logits = logits

    def replay(self, tokens: torch.Tensor, meta: torch.Tensor, n_logits: int) -> torch.Tensor:
        """meta: the step's metadata on the host (pinned), laid out and padded as ``self.meta``."""
        self.tokens[: tokens.shape[0]].copy_(tokens)
        self.meta.copy_(meta, non_blocking=True)
        self.graph.replay()
        return self.logits[:n_logits]


class Runner:
    """Runs ``model``: ``runner(tokens, cache, logits_at)`` computes ``model(tokens, cache, logits_at)``,
    ``runner.forward_packed(tokens, spans, cache, logits_rows)`` a packed step (see there).

    Args:
        model: a loaded :class:`~minillama.model.Transformer` (its backend is already chosen).
        cuda_graphs: replay decode steps and packed steps as CUDA graphs; default: on for CUDA models.
        max_graphs: graphs kept, least recently used dropped first (each holds its buffers).
            Decode and packed graphs count together.

    The logits of a replayed step are the graph's output buffer: the next step overwrites them.
    """

    max_packed_tokens = 4096  # larger packed steps run eagerly (a graph's buffers grow with its tokens)
    max_scored_tokens = 1024  # and larger steps that score prompt tokens: their graphs share one logits
    # buffer of this many rows (256 MB for Llama 3.1's vocabulary in bf16)

    def __init__(self, model: Transformer, cuda_graphs: Optional[bool] = None, max_graphs: int = 16):
        self.model = model
        self.config = model.config
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA model, this one is on {self.device}")
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[tuple, _Graph]" = OrderedDict()
        self._pool = None
        self._packed_seen = set()  # keys of packed steps run once (eagerly)
        self._scored_logits: Optional[torch.Tensor] = None  # (max_scored_tokens, V): scored graphs' output
        self.gemv_timings: Optional[dict] = None  # {role: {config: ms per matrix}}, by tune_gemv

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for this model: ``batch`` rows of ``max_len`` tokens."""
        return self.model.new_cache(batch, max_len)

    def agree(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids every rank continues with: rank 0's, broadcast (identity without tensor parallelism).
        Every rank holds the same logits; this makes sampling (and NaN marks) agree without relying on
        identical random streams."""
        tp = self.model.tp
        return ids if tp is None else tp.broadcast_(ids)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                 logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of ``tokens`` (B, S) appended to the first B rows of ``cache`` (see the model's
        forward). With CUDA graphs, single-token steps replay the decode graph of their batch
        bucket, and a prefill of up to ``max_packed_tokens`` whose token bucket recurs over this
        cache replays the packed graph of that bucket (:meth:`forward_packed`); other prefills run
        eagerly. Pass ``logits_at`` on the host (it is read without waiting for the device)."""
        B, S = tokens.shape
        if cache is not None and B > cache.batch:
            raise ValueError(f"{B} rows of tokens but the cache holds {cache.batch} rows")
        if not self.cuda_graphs or cache is None or (S == 1 and logits_at is not None):
            return self.model(tokens, cache if cache is None else cache.rows(0, B), logits_at=logits_at)
        if S > 1:
            # a prefill: the packed graph of its token bucket when the bucket recurs; the first
            # time, and past max_packed_tokens, flashcore's prefill kernel eagerly
            if B * S > self.max_packed_tokens or not self._recurs(packed_bucket(B * S), cache):
                return self.model(tokens, cache.rows(0, B), logits_at=logits_at)
            rows = None if logits_at is None else [b * S + int(i) for b, i in enumerate(logits_at.tolist())]
            logits = self.forward_packed(tokens.reshape(-1), [(b, S) for b in range(B)], cache, rows)
            return logits.view(B, -1, logits.shape[-1])
        lens = cache.seq_lens_cpu
        if max(lens[:B]) + 1 > cache.max_len:  # flashcore checks this; inside a graph it cannot
            b = max(range(B), key=lambda i: lens[i])
            raise ValueError(
                f"row {b}: {lens[b]} cached + 1 new token = {lens[b] + 1} exceeds the cache capacity "
                f"S_max={cache.max_len}; allocate a larger cache"
            )
        rows = B
        if B < cache.batch:
            padded = min(bucket(B), cache.batch)
            if padded > B and max(lens[B:padded]) + 1 <= cache.max_len:  # pad rows write a slot at their fill
                rows = padded
            cache = cache.rows(0, rows)
        key = ("decode", rows, cache.k.data_ptr(), cache.k.stride(), cache.k.shape)
        graph = self._graphs.get(key)
        if graph is None or graph.cache_ptrs != (cache.v.data_ptr(), cache.seq_lens.data_ptr()):
            graph = self._capture(key, tokens, cache)
        self._graphs.move_to_end(key)
        logits = graph.replay(tokens)
        return logits if rows == B else logits[:B]

    @torch.inference_mode()
    def forward_packed(self, tokens: torch.Tensor, spans: Sequence[Tuple[int, int]], cache: KVCache,
                       logits_rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Logits of a packed step (the model's ``forward_packed``): each span ``(row, n)`` is n new
        tokens of that cache row at its fill, ``tokens`` (T,) holds them span after span. Logits
        (N, V) of the tokens at ``logits_rows`` (host ints into the T tokens; None: all T). The
        fills are read, not advanced (the caller does, after).

        With CUDA graphs on, a step replays the graph of its token bucket over this cache (the
        logits are then the graph's buffer: the next step overwrites them) when the bucket was
        captured (:meth:`capture_packed`) or is seen a second time (:meth:`_recurs`). A step that
        wants more logits rows than cache rows (it scores prompt tokens) has graphs of its own, with
        a logits row per token, up to ``max_scored_tokens``."""
        T = tokens.shape[0]
        lens, seen, flat, start = cache.seq_lens_cpu, set(), [], 0
        for row, n in spans:
            if not 0 <= row < cache.batch or row in seen:
                raise ValueError(f"span row {row} must be a distinct row of the cache's {cache.batch}")
            if n < 1:
                raise ValueError(f"the span of row {row} has {n} tokens: give each span at least one")
            if lens[row] + n > cache.max_len:
                raise ValueError(f"row {row}: {lens[row]} cached + {n} new tokens = {lens[row] + n} exceeds the "
                                 f"cache capacity S_max={cache.max_len}; allocate a larger cache")
            seen.add(row)
            flat.append((start, n, row, lens[row]))
            start += n
        if start != T:
            raise ValueError(f"the spans hold {start} tokens but tokens has {T}")
        tiles = flashcore.varlen_tiles(flat)
        positions = [p for _, n, _, pos in flat for p in range(pos, pos + n)]
        rows = list(range(T)) if logits_rows is None else [int(r) for r in logits_rows]
        if self.cuda_graphs and T <= self.max_packed_tokens:
            size = packed_bucket(T)
            n_tiles, n_logits = packed_capacity(size, cache.batch)
            scored = len(rows) > n_logits
            if scored:
                n_tiles, n_logits = packed_capacity(size, cache.batch, scored=True)
            if len(tiles) <= n_tiles and (not scored or size <= self.max_scored_tokens) \
                    and self._recurs(size, cache, scored):
                meta = (positions + [0] * (size - T) + [x for t in tiles for x in t] + [0] * (4 * (n_tiles - len(tiles)))
                        + rows + [0] * (n_logits - len(rows)))
                return self._packed_graph(size, cache, scored).replay(tokens, _host(meta, self.device), len(rows))
        meta = _host(positions + [x for t in tiles for x in t] + rows, self.device).to(self.device, non_blocking=True)
        positions, tiles, rows = meta.split([T, 4 * len(tiles), len(rows)])
        return self.model.forward_packed(tokens, positions, tiles.view(-1, 4), cache, rows)

    def capture_packed(self, cache: KVCache, max_tokens: int) -> None:
        """Capture the packed-step graph of every token bucket up to ``max_tokens`` over ``cache``
        now (a no-op without CUDA graphs), so that no step waits for a capture."""
        if not self.cuda_graphs:
            return
        size = 0
        while size < min(max_tokens, self.max_packed_tokens):
            size = packed_bucket(size + 1)
            self._packed_graph(size, cache)

    def _recurs(self, size: int, cache: KVCache, scored: bool = False) -> bool:
        """Whether packed steps of this token bucket (scored or not) over this cache have a graph or
        ran before (then the next one captures it); marks them as seen. A shape seen once (a chat
        turn's prompt) runs eagerly and pays no capture."""
        key = _packed_key(size, cache, scored)
        if key in self._graphs or key in self._packed_seen:
            return True
        self._packed_seen.add(key)
        return False

    def _packed_graph(self, size: int, cache: KVCache, scored: bool = False) -> _PackedGraph:
        key = _packed_key(size, cache, scored)
        graph = self._graphs.get(key)
        if graph is None:
            self.tune_gemv()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            logits_out = None
            if scored:
                if self._scored_logits is None or self._scored_logits.shape[0] < size:
                    self._scored_logits = torch.empty(self.max_scored_tokens, self.config.vocab_size,
                                                      dtype=self.dtype, device=self.device)
                logits_out = self._scored_logits
            graph = self._graphs[key] = _PackedGraph(self.model, cache, size, self._pool, logits_out)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return graph

    def _capture(self, key: tuple, tokens: torch.Tensor, cache: KVCache) -> _Graph:
        """Capture the decode step over ``cache`` (all its rows; tokens may fill the first ones)."""
        self.tune_gemv()  # timing runs its own graphs: never inside a capture
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        padded = torch.zeros(cache.batch, 1, dtype=tokens.dtype, device=tokens.device)
        padded[: tokens.shape[0]] = tokens
        graph = self._graphs[key] = _Graph(self.model, padded, cache, self._pool)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph

    def clear(self) -> None:
        """Drop every graph (and the memory their buffers hold)."""
        self._graphs.clear()
        self._packed_seen.clear()
        self._pool = None
        self._scored_logits = None

    def gemv_roles(self) -> dict:
        """{role: [(linear, the norm before it or None)]}: the single-token products by matrix kind."""
        layers, model = self.model.layers, self.model
        return {
            "qkv": [(L.attention.wqkv, L.attention_norm) for L in layers],
            "o": [(L.attention.wo, None) for L in layers],
            "gate_up": [(L.feed_forward.w13, L.ffn_norm) for L in layers],
            "down": [(L.feed_forward.w2, None) for L in layers],
            "head": [(model.output, model.norm)],
        }

    def gemv_call(self, role: str, linear, norm, normed: Optional[NormedRows] = None):
        """A single-token call of ``linear`` as the forward makes it, for timing: its input's residual
        add + norm deferred into the GEMV where a norm precedes it; the norm after it where
        ``linear.norm_next`` is set (the final norm stands for it); RoPE of q and k for "qkv".
        normed: the input, a :class:`NormedRows` as the GEMV before returns it with the norm after it
        (``norm_next_call``): the norm ran in that GEMV's epilogue, but for the 1 / rms."""
        rope = None
        if role == "qkv":
            D = self.config.head_dim
            cos, sin = (torch.randn(1, D, dtype=self.dtype, device=self.device) for _ in range(2))
            rope = Rope(cos, sin, (linear.parts[0] + linear.parts[1]) // D, D)  # this rank's q and k heads
        if normed is not None:
            return lambda: linear(normed, rope=rope)
        x = torch.randn(1, 1, linear.in_features, dtype=self.dtype, device=self.device)
        residual = torch.randn_like(x)
        if norm is None:
            if linear.norm_next:  # the forward runs the norm after it in its GEMV: time that
                return self.norm_next_call(linear, self.model.norm)
            return lambda: linear(x, rope=rope)
        return lambda: linear(norm(x, residual)[0], rope=rope)

    def norm_next_call(self, linear, norm):
        """A single-token call of ``linear`` with ``norm`` (residual add + RMSNorm) after it, for
        timing: with ``linear.norm_next`` set, the norm runs in the GEMV's epilogue."""
        x = torch.randn(1, 1, linear.in_features, dtype=self.dtype, device=self.device)
        residual = torch.randn(1, 1, linear.out_features, dtype=self.dtype, device=self.device)
        return lambda: norm(linear(x), residual)

    def tensor_core_tilings(self, role: str, lins) -> list:
        """The tilings of the tensor-core GEMV (``kernels.TENSOR_CORE_GEMV_TILINGS``) that fit every
        matrix of ``lins`` (each one's rows and K; with RoPE for "qkv", a head's half): none unless
        their weights are 8-bit and this GPU and Triton run it (``tensor_core_gemv.usable``)."""
        kernels = self.model.backend.kernels
        if any(getattr(lin, "weight_scale", None) is None for lin in lins):
            return []
        from minillama import tensor_core_gemv  # imported where it may run: Gluon is experimental
        x = torch.empty(1, dtype=self.dtype, device=self.device)
        head_dim = self.config.head_dim if role == "qkv" else None
        return [t for t in kernels.TENSOR_CORE_GEMV_TILINGS
                if all(tensor_core_gemv.usable(x, lin.weight)
                       and tensor_core_gemv.fits(t, lin.weight.shape[0], lin.weight.shape[1], head_dim)
                       for lin in lins)]

    def tune_gemv(self) -> None:
        """Give each matrix kind its fastest GEMV tiling on this GPU, timed in CUDA graphs; once.

        Each candidate runs over every layer's matrix of that kind, so the weights stream from
        HBM, not L2, and the launch gaps are the graph's. Where a norm precedes the matrix, each
        tiling is timed with the residual add + RMSNorm in the GEMV's prologue and as its own
        kernel before it (``Linear.fuse_norm``): every program of the fused GEMV reloads the
        input and the norm's gain, which costs more than the extra launch where a weight row is
        short and 8-bit (H200, 2026-12-01: Llama-3.1-70B's fp8 gate/up 128.9 us fused, 119.5
        separate; the 8B's bf16 gate/up and qkv are faster fused). Then, for o and down of a
        model without tensor parallelism, the norm after them in their GEMV's epilogue
        (``Linear.norm_next``) and the next GEMV applying its 1 / rms, where that pair takes less
        time (the 8B's fp8 and int8 on the H200, 2026-12-02: 1.2 us less per layer for each pair
        together, when the last program normed the whole row).
        8-bit weights also get the tensor-core GEMV's tilings (:meth:`tensor_core_tilings`), with
        the norm before them as its own kernel. Only for the Triton backend on CUDA.
        """
        backend = self.model.backend
        if self.gemv_timings is not None or not getattr(backend, "gemv", False) or self.device.type != "cuda":
            return
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("Runner.tune_gemv must run before a CUDA graph capture")
        kernels = backend.kernels
        self.gemv_timings = {}

        def fastest(name, lins, steps, settings):
            """Time steps (one per layer) under each setting applied to lins; keep the fastest."""
            times = {}
            for setting in settings:
                for lin in lins:
                    lin.gemv_config, lin.fuse_norm, lin.norm_next = setting
                times[setting] = kernels.time_in_graph(lambda: [step() for step in steps]) / len(steps)
            best = min(times, key=times.get)
            for lin in lins:
                lin.gemv_config, lin.fuse_norm, lin.norm_next = best
            self.gemv_timings[name] = {
                f"{c}{'' if fused else ' norm apart'}{' + next norm' if norm_next else ''}": ms
                for (c, fused, norm_next), ms in times.items()}
            return best, times[best]

        with torch.inference_mode():
            roles = self.gemv_roles()
            best = {}
            for role, calls in roles.items():
                lins = [lin for lin, _ in calls]
                steps = [self.gemv_call(role, lin, norm) for lin, norm in calls]
                fuse = (True, False) if calls[0][1] is not None else (True,)
                # the tensor-core GEMV runs the norm before it as its own kernel (fuse_norm False)
                best[role] = fastest(role, lins, steps, [(c, f, False) for f in fuse for c in kernels.GEMV_CONFIGS]
                                     + [(t, fuse[-1], False) for t in self.tensor_core_tilings(role, lins)])
            for producer, consumer in (("o", "gate_up"), ("down", "qkv")):
                producers = [lin for lin, _ in roles[producer]]
                if any(lin.parallel is not None for lin in producers):
                    continue  # a row-parallel product is all-reduced before the residual add
                consumers = [lin for lin, _ in roles[consumer]]
                kept = {lin: (lin.gemv_config, lin.fuse_norm, lin.norm_next) for lin in producers + consumers}
                # the consumer's norms stand for the ones after the producer: same size, same work
                tail_steps = [self.norm_next_call(lin, norm) for lin, (_, norm) in zip(producers, roles[consumer])]
                _, tail_ms = fastest(f"{producer} + next norm", producers, tail_steps,
                                     [(c, True, True) for c in kernels.GEMV_CONFIGS])
                normed = [step()[0] for step in tail_steps]  # what the fastest producers hand on
                _, plain_ms = fastest(f"{consumer} after {producer}'s norm", consumers,
                                      [self.gemv_call(consumer, lin, None, normed=n)
                                       for lin, n in zip(consumers, normed)],
                                      [(c, True, False) for c in kernels.GEMV_CONFIGS]
                                      + [(t, True, False) for t in self.tensor_core_tilings(consumer, consumers)])
                if tail_ms + plain_ms >= best[producer][1] + best[consumer][1]:
                    for lin, setting in kept.items():
                        lin.gemv_config, lin.fuse_norm, lin.norm_next = setting


def _packed_key(size: int, cache: KVCache, scored: bool = False) -> tuple:
    return ("scored" if scored else "packed", size, cache.k.data_ptr(), cache.k.stride(), cache.k.shape,
            cache.v.data_ptr())


def _host(values: List[int], device: torch.device) -> torch.Tensor:
    """int64 values on the host, pinned when bound for CUDA: a non-blocking copy from there does not
    make the host wait for the device (pinned blocks are not reused before their copy is done)."""
    host = torch.tensor(values, dtype=torch.long)
    return host.pin_memory() if device.type == "cuda" else host

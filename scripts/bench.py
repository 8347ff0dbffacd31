"""Benchmark minillama's GPU fast path against the plain path and Hugging Face transformers.

Builds a Llama-3.1-8B-shaped model with random bf16 weights directly on the GPU (or loads a
checkpoint folder with --model) and measures, in one run:

  * ready: wall time from the weights being on the GPU to the first decoded token of a 512-token
    prompt (load-time fusion, Triton compilation and autotuning, CUDA-graph capture included;
    a fresh Triton cache unless --warm-triton-cache);
  * TTFT: time to first token for 512- and 2048-token prompts (TokenLoop, median of --reps, after
    two untimed prompts of the same length: the first runs eagerly, the second captures the packed
    CUDA graph of its token bucket, as for any prompt length that recurs); the first (eager) one
    is in the JSON too;
  * decode tok/s at batch 1, 16, 64 with cache lengths 512, 8192, 32768, per sequence and
    aggregate, with a host sync per token as TokenLoop does (and without, in the JSON); achieved
    GB/s = (weights read per step without the embedding table + K/V read) / step time; peak GPU
    memory over weights + cache. Combinations whose cache does not fit are skipped and listed;
  * ablations at batch 1 / cache 512: the torch backend eager and in CUDA graphs, the Triton backend
    with cuBLAS instead of the GEMV, and the GEMV against cuBLAS per weight matrix;
  * HF transformers eager and static-cache ``generate()`` (when installed), same shapes.

Prints a table last and writes everything to --out (JSON). Usage on the GPU machine:

    PYTHONPATH=. python3 scripts/bench.py --out bench.json

Tensor parallel (one process per GPU; rank 0 writes the table and the JSON; no HF baselines or
ablations): ``NCCL_NVLS_ENABLE=0 PYTHONPATH=. torchrun --nproc-per-node 2 scripts/bench.py --shape 70b``.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder; default: random weights of --shape")
    p.add_argument("--shape", default="8b", choices=("8b", "70b"), help="Llama-3.1 shapes of the random model")
    p.add_argument("--out", default="bench.json", help="JSON results file")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--cache-lens", default="512,8192,32768")
    p.add_argument("--prompt-lens", default="512,2048")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per combination")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each TTFT measurement")
    p.add_argument("--hf", default="eager,static", help="HF baselines to run: eager,static or none")
    p.add_argument("--skip-ablations", action="store_true")
    p.add_argument("--quantize", choices=("int8", "fp8"),
                   help="8-bit projection weights, per-channel scales (skips the ablations, which time bf16 cuBLAS)")
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: lm_head in 8 bits too")
    p.add_argument("--warm-triton-cache", action="store_true",
                   help="keep the user's Triton cache (default: a fresh one, so 'ready' includes compilation)")
    return p.parse_args()


ARGS = parse_args()
if ARGS.quantize_lm_head and ARGS.quantize is None:
    raise SystemExit("--quantize-lm-head quantizes lm_head along with the projections: add --quantize int8 or fp8")
ARGS.skip_ablations = ARGS.skip_ablations or ARGS.quantize is not None
if not ARGS.warm_triton_cache:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

from minillama.backend import TorchBackend, TritonBackend  # noqa: E402
from minillama.config import LlamaConfig  # noqa: E402
from minillama.generate import TokenLoop  # noqa: E402
from minillama.kernels import time_in_graph  # noqa: E402
from minillama.model import Transformer, rope_inv_freq  # noqa: E402
from minillama.parallel import join_from_environment  # noqa: E402
from minillama.quantization import quantize_model  # noqa: E402
from minillama.runner import Runner  # noqa: E402
from minillama.sampling import SamplingParams, sample  # noqa: E402
from llama31_shapes import LLAMA31_70B, LLAMA31_8B  # noqa: E402  (scripts/, beside this file)

GiB = 1024**3
GREEDY = SamplingParams()  # temperature 0
RESULTS = {"config": {}, "ours": {}, "ablations": {}, "hf": {}, "skipped": []}
TP = join_from_environment("cuda")  # None unless launched by torchrun
WORLD = TP.world_size if TP is not None else 1
LEAD = TP is None or TP.rank == 0  # the process that writes the JSON and prints


def save():
    if LEAD:
        with open(ARGS.out, "w") as f:
            json.dump(RESULTS, f, indent=2)


def log(msg):
    if LEAD:
        print(msg, file=sys.stderr, flush=True)


def random_model(config: LlamaConfig, device) -> Transformer:
    """Random bf16 weights of ``config`` on ``device`` (this rank's shards under torchrun)."""
    with torch.device("meta"):
        model = Transformer(config, TritonBackend(), TP).to(torch.bfloat16)
    model.to_empty(device=device)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.05, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)  # never zeros: they can time faster than data
        model.inv_freq = rope_inv_freq(config).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def kv_bytes(config: LlamaConfig, batch: int, length: int) -> int:
    """K and V bytes of one rank's cache."""
    return 2 * config.num_hidden_layers * batch * length * config.num_key_value_heads // WORLD * config.head_dim * 2


def set_backend(model: Transformer, backend) -> None:
    """Run the same weights under another backend (for the ablations)."""
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend


def run_loop(runner, prompts, max_new_tokens):
    loop = TokenLoop(runner, prompts, max_new_tokens)
    for _ in loop:
        pass
    return loop


def ttft(runner, prompt_len, reps, vocab):
    """(median TTFT of ``reps`` prompts of ``prompt_len`` tokens, TTFT of the first, eager one) in s."""
    times = []
    for r in range(reps + 2):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(r)).tolist()
        torch.cuda.synchronize()
        # the loop (and its cache) is dropped at once, as Llama.generate drops it: the next cache
        # lands where this one was, and the packed graph of the prompt's bucket serves it
        times.append(run_loop(runner, [prompt], 1).times.prefill_s)
    return statistics.median(times[2:]), times[0]


def decode_rate(runner, config, batch, length, steps, sync_each):
    """Seconds per decode step at fill ``length`` (cache random beyond), median of 3 passes."""
    device = runner.device
    cache = runner.new_cache(batch, length + steps + 2)
    cache.k.normal_()
    cache.v.normal_()
    tokens = torch.randint(0, config.vocab_size, (batch, 1), device=device)
    per_step = []
    with torch.inference_mode():
        for rep in range(4):  # the first pass captures the graph; not timed
            cache.set_lengths([length] * batch)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps if rep else 2):
                logits = runner(tokens, cache)
                cache.advance(1)
                tokens = sample(logits[:, -1], GREEDY)[:, None]  # as generate picks greedily
                if sync_each:
                    tokens.tolist()
            torch.cuda.synchronize()
            if rep:
                per_step.append((time.perf_counter() - start) / steps)
    del cache
    return statistics.median(per_step)


def gemv_vs_cublas(runner: Runner):
    """Per matrix kind at one token, timed in a CUDA graph over all layers: the tuned GEMV (with its
    fusions) and cuBLAS (F.linear alone), in microseconds per matrix and GB/s."""
    F = torch.nn.functional
    out = {}
    with torch.inference_mode():
        for role, calls in runner.gemv_roles().items():
            lin0 = calls[0][0]
            steps = [runner.gemv_call(role, lin, norm) for lin, norm in calls]
            x = torch.randn(1, 1, lin0.in_features, device="cuda", dtype=torch.bfloat16)
            ms_gemv = time_in_graph(lambda: [step() for step in steps]) / len(calls)
            ms_cublas = time_in_graph(lambda: [F.linear(x, lin.weight) for lin, _ in calls]) / len(calls)
            nbytes = lin0.weight.numel() * lin0.weight.element_size()
            out[role] = dict(MB=nbytes / 1e6, config=str(lin0.gemv_config), fuse_norm=lin0.fuse_norm,
                             norm_next=lin0.norm_next, gemv_us=ms_gemv * 1e3,
                             cublas_us=ms_cublas * 1e3, gemv_GBps=nbytes / ms_gemv / 1e6,
                             cublas_GBps=nbytes / ms_cublas / 1e6,
                             all_configs_us={k: v * 1e3 for k, v in (runner.gemv_timings or {}).get(role, {}).items()})
    return out


def kernel_profile(runner, config, batch, length):
    """GPU time per decode step by kernel name (torch.profiler over graph replays), and the step's wall."""
    cache = runner.new_cache(batch, length + 40)
    cache.k.normal_()
    cache.v.normal_()
    tokens = torch.randint(0, config.vocab_size, (batch, 1), device=runner.device)
    steps = 10
    with torch.inference_mode():
        cache.set_lengths([length] * batch)
        for _ in range(3):
            runner(tokens, cache)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                logits = runner(tokens, cache)
                cache.advance(1)
                tokens = sample(logits[:, -1], GREEDY)[:, None]  # as generate picks greedily
            torch.cuda.synchronize()
    rows = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t > 0:
            rows[evt.key[:60]] = dict(us_per_step=t / steps, calls_per_step=evt.count / steps)
    del cache
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["us_per_step"])[:14])


def bench_ours(model, config):
    vocab = config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters())
    stream_bytes = weight_bytes - model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    if config.tie_word_embeddings:
        stream_bytes += model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    RESULTS["config"].update(weight_GB=weight_bytes / 1e9, weights_read_per_step_GB=stream_bytes / 1e9)

    # -- ready: weights on the GPU -> first decoded token, everything included --
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    runner = Runner(model)
    prompt = torch.randint(0, vocab, (512,), generator=torch.Generator().manual_seed(123)).tolist()
    loop = TokenLoop(runner, [prompt], 2)
    it = iter(loop)
    next(it)
    first = time.perf_counter() - t0
    next(it)
    ready = time.perf_counter() - t0
    RESULTS["ours"]["ready_s"] = ready
    RESULTS["ours"]["cold_first_token_s"] = first
    log(f"ready {ready:.1f} s (first token {first:.1f} s)")
    save()

    # -- TTFT --
    for P in map(int, ARGS.prompt_lens.split(",")):
        torch.cuda.reset_peak_memory_stats()
        steady, eager = ttft(runner, P, ARGS.reps, vocab)
        RESULTS["ours"][f"ttft_{P}_ms"], RESULTS["ours"][f"ttft_{P}_eager_ms"] = steady * 1e3, eager * 1e3
        peak = torch.cuda.max_memory_allocated()
        cache = kv_bytes(config, 1, P + 1)
        RESULTS["ours"][f"ttft_{P}_overhead_GiB"] = (peak - weight_bytes - cache) / GiB
        if not ARGS.skip_ablations:
            triton_backend = model.backend
            set_backend(model, TorchBackend())
            RESULTS["ablations"][f"torch_backend_ttft_{P}_ms"] = ttft(Runner(model), P, ARGS.reps, vocab)[0] * 1e3
            set_backend(model, triton_backend)
        log(f"TTFT {P}: {RESULTS['ours'][f'ttft_{P}_ms']:.1f} ms (first, eager: {eager * 1e3:.1f} ms)")
    save()

    # -- decode grid --
    steps = ARGS.steps
    decode = RESULTS["ours"]["decode"] = []
    for B in map(int, ARGS.batches.split(",")):
        for L in map(int, ARGS.cache_lens.split(",")):
            need = kv_bytes(config, B, L + steps + 2)
            runner.clear()
            gc.collect()
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            if need + 1.5 * GiB > free:
                msg = f"B={B} cache={L}: K/V needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free of {total / 1e9:.1f}"
                RESULTS["skipped"].append(msg)
                log("skip " + msg)
                continue
            torch.cuda.reset_peak_memory_stats()
            step_s = decode_rate(runner, config, B, L, steps, sync_each=True)
            peak = torch.cuda.max_memory_allocated()
            step_nosync = decode_rate(runner, config, B, L, steps, sync_each=False)
            kv_read = kv_bytes(config, B, L + steps // 2)
            row = dict(batch=B, cache=L, step_ms=step_s * 1e3, tok_s_per_seq=1 / step_s, tok_s_total=B / step_s,
                       step_ms_nosync=step_nosync * 1e3, tok_s_total_nosync=B / step_nosync,
                       GBps=(stream_bytes + kv_read) / step_s / 1e9, kv_GB=kv_read / 1e9,
                       peak_GiB=peak / GiB, overhead_GiB=(peak - weight_bytes - need) / GiB)
            decode.append(row)
            log(f"decode B={B} L={L}: {row['tok_s_per_seq']:.1f} tok/s/seq, {row['tok_s_total']:.0f} total, "
                f"{row['GBps']:.0f} GB/s, overhead {row['overhead_GiB']:.2f} GiB")
            save()

    # -- end to end through TokenLoop (prefill + decode, host loop, per-token sync) --
    for B in (1, 16):
        prompts = [torch.randint(0, vocab, (512,), generator=torch.Generator().manual_seed(b)).tolist()
                   for b in range(B)]
        cache = runner.new_cache(B, 512 + 128)
        for n_new in (4, 128):  # the first run captures this batch's graph for this cache
            cache.set_lengths([0] * B)
            loop = TokenLoop(runner, prompts, n_new, cache=cache)
            for _ in loop:
                pass
        del cache
        RESULTS["ours"][f"tokenloop_b{B}_tok_s_per_seq"] = loop.times.decode_steps / loop.times.decode_s
    save()

    if not ARGS.skip_ablations:
        runner.clear()
        ab = RESULTS["ablations"]
        triton = model.backend
        set_backend(model, TorchBackend())
        ab["torch_eager_b1_c512_tok_s"] = 1 / decode_rate(Runner(model, cuda_graphs=False), config, 1, 512, 32, True)
        ab["torch_graphs_b1_c512_tok_s"] = 1 / decode_rate(Runner(model), config, 1, 512, steps, True)
        set_backend(model, TritonBackend(gemv=False))
        ab["triton_cublas_graphs_b1_c512_tok_s"] = 1 / decode_rate(Runner(model), config, 1, 512, steps, True)
        set_backend(model, triton)
        ab["gemv_vs_cublas"] = gemv_vs_cublas(runner)
        save()
        for B in (1, 16):
            try:
                ab[f"kernels_b{B}_c512"] = kernel_profile(runner, config, B, 512)
            except Exception as e:  # the profiler is a diagnostic; never lose the numbers for it
                ab[f"kernels_b{B}_c512"] = {"error": f"{type(e).__name__}: {e}"}
            runner.clear()
        save()
    runner.clear()


def bench_hf(config: LlamaConfig, modes):
    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        RESULTS["hf"]["error"] = "transformers not installed"
        return
    RESULTS["hf"]["version"] = transformers.__version__
    device = torch.device("cuda")
    t0 = time.perf_counter()
    if ARGS.model:
        hf = LlamaForCausalLM.from_pretrained(ARGS.model, dtype=torch.bfloat16, device_map="cuda")
    else:
        hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_dict().items()
                                                if k not in ("architectures", "torch_dtype")})
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                hf = LlamaForCausalLM(hf_config)
        finally:
            torch.set_default_dtype(prev)
    hf.eval()
    hf.generation_config.pad_token_id = 0
    RESULTS["hf"]["build_s"] = time.perf_counter() - t0
    vocab = config.vocab_size
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Host times of the tokens generate() emits (it syncs for each, to check stopping)."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def gen(ids, n, **kw):
        """(time to first new token s, decode tok/s per sequence after it) of one generate() call."""
        clock = Clock()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, streamer=clock, **kw)
        new = clock.times[1:]  # the first put() is the prompt
        rate = (len(new) - 1) / (new[-1] - new[0]) if len(new) > 1 else float("nan")
        return new[0] - t, rate

    n = 65
    for mode in modes:
        # static: every call below has the same shapes, so generate() compiles its step once
        kw = {"cache_implementation": "static"} if mode == "static" else {}
        res = RESULTS["hf"][mode] = {}
        try:
            ids512 = torch.randint(0, vocab, (1, 512), device=device)
            t = time.perf_counter()
            gen(ids512, n, **kw)
            res["first_call_s"] = time.perf_counter() - t  # static: includes the compilation
            runs = [gen(ids512, n, **kw) for _ in range(3)]
            res["ttft_512_ms"] = statistics.median(r[0] for r in runs) * 1e3
            res["b1_c512_tok_s_per_seq"] = statistics.median(r[1] for r in runs)
            if mode == "eager":
                for P in map(int, ARGS.prompt_lens.split(",")):
                    if P != 512:
                        ids = torch.randint(0, vocab, (1, P), device=device)
                        gen(ids, 2)
                        res[f"ttft_{P}_ms"] = statistics.median(gen(ids, 2)[0] for _ in range(3)) * 1e3
                ids = torch.randint(0, vocab, (16, 512), device=device)
                gen(ids, 4)
                res["b16_c512_tok_s_per_seq"] = gen(ids, n)[1]
            log(f"HF {mode}: {res}")
        except Exception as e:  # a broken baseline must not lose our numbers
            res["error"] = f"{type(e).__name__}: {e}"
            log(f"HF {mode} failed: {res['error']}")
        save()
        torch._dynamo.reset()
    del hf


def table():
    o, hf, ab = RESULTS["ours"], RESULTS["hf"], RESULTS["ablations"]
    lines = [f"device: {RESULTS['config'].get('device')}   torch {torch.__version__}   triton {triton.__version__}"
             f"   transformers {hf.get('version', '-')}",
             f"weights read per step {RESULTS['config'].get('weights_read_per_step_GB', 0):.2f} GB",
             "", f"{'metric':44s} {'minillama':>12s} {'HF eager':>10s} {'HF static':>10s}"]

    def hfv(mode, key, fmt):
        v = hf.get(mode, {}).get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    lines.append(f"{'ready (weights loaded -> first decoded token) s':44s} {o.get('ready_s', 0):12.1f} "
                 f"{'-':>10s} {hfv('static', 'first_call_s', '10.1f')}")
    for P in map(int, ARGS.prompt_lens.split(",")):
        lines.append(f"{f'TTFT {P} tokens ms':44s} {o.get(f'ttft_{P}_ms', 0):12.1f} "
                     f"{hfv('eager', f'ttft_{P}_ms', '10.1f')} {hfv('static', f'ttft_{P}_ms', '10.1f')}")
    for B in (1, 16):
        lines.append(f"{f'TokenLoop decode B={B} cache 512 tok/s/seq':44s} "
                     f"{o.get(f'tokenloop_b{B}_tok_s_per_seq', 0):12.1f} "
                     f"{hfv('eager', f'b{B}_c512_tok_s_per_seq', '10.1f')} "
                     f"{hfv('static', f'b{B}_c512_tok_s_per_seq', '10.1f')}")
    lines += ["", f"{'B':>3s} {'cache':>6s} {'ms/step':>8s} {'tok/s/seq':>10s} {'tok/s all':>10s} "
                  f"{'nosync all':>10s} {'GB/s':>7s} {'peak GiB':>9s} {'over GiB':>9s}"]
    for r in o.get("decode", []):
        lines.append(f"{r['batch']:3d} {r['cache']:6d} {r['step_ms']:8.2f} {r['tok_s_per_seq']:10.1f} "
                     f"{r['tok_s_total']:10.0f} {r['tok_s_total_nosync']:10.0f} {r['GBps']:7.0f} "
                     f"{r['peak_GiB']:9.2f} {r['overhead_GiB']:9.2f}")
    for s in RESULTS["skipped"]:
        lines.append(f"skipped: {s}")
    if ab:
        lines += ["", "ablations, B=1 cache 512, tok/s: " + ", ".join(
            f"{k}={v:.1f}" for k, v in ab.items() if isinstance(v, float))]
        for name, row in ab.get("gemv_vs_cublas", {}).items():
            lines.append(f"  {name:8s} {row['MB']:7.1f} MB  GEMV{row['config']:14s} {row['gemv_us']:7.1f} us "
                         f"{row['gemv_GBps']:6.0f} GB/s   cuBLAS {row['cublas_us']:7.1f} us {row['cublas_GBps']:6.0f} GB/s")
        for B in (1, 16):
            prof = ab.get(f"kernels_b{B}_c512", {})
            if prof and "error" not in prof:
                lines.append(f"  GPU time per step by kernel, B={B} cache 512 (us, calls):")
                for name, r in list(prof.items())[:8]:
                    lines.append(f"    {r['us_per_step']:8.1f} {r['calls_per_step']:6.0f}  {name}")
    return "\n".join(lines)


def main():
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    RESULTS["config"].update(
        device=props.name, memory_GiB=props.total_memory / GiB, torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), argv=sys.argv,
        model=ARGS.model or f"random Llama-3.1-{ARGS.shape.upper()} shapes, bf16", tensor_parallel=WORLD,
        quantize=ARGS.quantize, quantize_lm_head=ARGS.quantize_lm_head,
    )
    if TP is not None:
        ARGS.skip_ablations, ARGS.hf = True, "none"  # the ablations and HF baselines are single-GPU
    if ARGS.model:
        from minillama import Llama

        llm = Llama.from_pretrained(ARGS.model, device="cuda", dtype=torch.bfloat16, backend="triton",
                                    quantize=ARGS.quantize, quantize_lm_head=ARGS.quantize_lm_head)
        model, config = llm.model, llm.config
    else:
        config = LlamaConfig(**(LLAMA31_70B if ARGS.shape == "70b" else LLAMA31_8B))
        model = random_model(config, device)
        if ARGS.quantize:
            quantize_model(model, ARGS.quantize, ARGS.quantize_lm_head)  # one matrix at a time, in place
    bench_ours(model, config)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    modes = [m for m in ARGS.hf.split(",") if m in ("eager", "static")]
    if modes:
        bench_hf(config, modes)
    save()
    if LEAD:
        print(table())


if __name__ == "__main__":
    main()

"""Benchmark flashcore against torch SDPA's flash and cuDNN backends (enable_gqa), bf16, Llama GQA shapes.

    PYTHONPATH=. python3 scripts/bench_attention.py --out bench.json [--sweep]

Shapes: H_q=32, H_kv=8, D=128.
- Causal prefill, B=1, S in 1024/4096/16384: TFLOP/s = 4 * B * H_q * S^2 * D / 2 / time. flashcore's
  time is the real call: seq_lens = 0, an S-sized cache, append and causal mask included. SDPA gets
  (B, H, S, D) tensors and no cache.
- Decode, one new token: B=1 cache 8192 and 32768, B=16 cache 8192. GB/s = K+V bytes read once
  (2 * B * L * H_kv * D * 2) / time. flashcore appends at seq_lens = L - 1 into an L-slot cache;
  SDPA attends q over the same cache as (B, H_kv, L, D) views, with no append.
Each implementation is timed as a CUDA graph of several calls (decode inputs rotate across cache
copies larger than the 50 MB L2), median of the replays; the "fc eager" column times flashcore's
plain Python call (launch overhead included), and "host us" is the host time of one such call (the
loop of calls timed on the host, without waiting for the GPU). ``--sweep`` also times other kernel
configs.
"""
import argparse
import datetime
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashcore
from flashcore import triton_attention as ta

H_Q, H_KV, D = 32, 8, 128
DTYPE = torch.bfloat16
PREFILL_S = (1024, 4096, 16384)
DECODE = ((1, 8192), (1, 32768), (16, 8192))
L2_ROTATE_BYTES = 256 << 20
HOST_CALLS = 32  # calls per loop of the host-time column, at least


def median_ms(fn, n_calls: int, reps: int, graph: bool) -> float:
    """Median time of one call: replay a graph of n_calls calls (or loop them eagerly), reps times."""
    for _ in range(3):
        fn(0)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(n_calls):
                fn(i)
        run = g.replay
    else:
        def run():
            for i in range(n_calls):
                fn(i)
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n_calls)
    return statistics.median(times)


def host_us(fn, n_calls: int, reps: int) -> float:
    """Median host time of one eager call: the loop of n_calls timed up to its last launch, without
    waiting for the GPU (which runs behind it)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(n_calls):
            fn(i)
        times.append((time.perf_counter() - start) / n_calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def timed(fn, n_calls, reps):
    """(graph ms, eager ms, eager host us per call, errors): a backend that rejects a shape or a
    capture is reported, not fatal."""
    results, errors = [], []
    for graph in (True, False):
        try:
            results.append(median_ms(fn, n_calls, reps, graph=graph))
        except Exception as e:
            torch.cuda.synchronize()
            results.append(None)
            errors.append(f"{'graph' if graph else 'eager'}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    # HOST_CALLS a loop at least: the GPU columns time a long prefill 1 call a loop, too few for the host
    host = host_us(fn, max(n_calls, HOST_CALLS), reps) if results[1] is not None else None
    return results[0], results[1], host, "; ".join(errors) or None


def sdpa(backend, q, k, v, causal):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def prefill_cases(S, sweep_configs):
    g = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(1, S, H_Q, D, device="cuda", generator=g).to(DTYPE)
    k = torch.randn(1, S, H_KV, D, device="cuda", generator=g).to(DTYPE)
    v = torch.randn(1, S, H_KV, D, device="cuda", generator=g).to(DTYPE)
    k_cache, v_cache = torch.empty_like(k), torch.empty_like(v)
    seq_lens = torch.zeros(1, dtype=torch.int32, device="cuda")
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, S, D) for SDPA
    flops = 4 * H_Q * S * S * D / 2
    n_calls, reps = max(1, 16384 // S) ** 2 // 4 + 1, 5 if S >= 16384 else 10
    scale = 1.0 / math.sqrt(D)

    want = sdpa(SDPBackend.FLASH_ATTENTION, qt, kt, vt, True).transpose(1, 2)
    runs = {
        # with the host copy of the fills, as the model calls it: on Hopper the Gluon kernel from
        # hopper_attention.MIN_PAIRS (query, key) pairs per head on (S = 1448 here), the Triton kernel below
        "flashcore": lambda i: flashcore.attention_with_kv_cache(q, k, v, k_cache, v_cache, seq_lens,
                                                                 seq_lens_cpu=[0]),
        # without it: the Triton kernel at every size
        "flashcore triton": lambda i: flashcore.attention_with_kv_cache(q, k, v, k_cache, v_cache, seq_lens),
        "sdpa-flash": lambda i: sdpa(SDPBackend.FLASH_ATTENTION, qt, kt, vt, True),
        "sdpa-cudnn": lambda i: sdpa(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, True),
    }
    for cfg in sweep_configs:
        runs[f"flashcore {tuple(cfg)}"] = (lambda c: lambda i: ta._launch_prefill(
            q, k, v, k_cache, v_cache, seq_lens, scale, True, c))(cfg)
    rows = []
    for name, fn in runs.items():
        err = None
        if name.startswith("flashcore"):
            try:
                err = (fn(0).float() - want.float()).abs().max().item()
            except Exception as e:
                rows.append(dict(kind="prefill", S=S, impl=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
        ms, eager_ms, eager_host_us, error = timed(fn, n_calls, reps)
        rows.append(dict(kind="prefill", B=1, S=S, impl=name, ms=ms, eager_ms=eager_ms, eager_host_us=eager_host_us,
                         tflops=flops / ms / 1e9 if ms else None,
                         eager_tflops=flops / eager_ms / 1e9 if eager_ms else None,
                         max_diff_vs_sdpa_flash=err, error=error))
    return rows


def num_sms():
    return ta._num_sms(torch.device("cuda"))


def decode_config(B, L):
    """The config flashcore picks for this decode shape."""
    return ta._decode_config(D, DTYPE, False, B * H_KV, L, num_sms())


def decode_cases(B, L, sweep_configs):
    kv_bytes = 2 * B * L * H_KV * D * DTYPE.itemsize
    copies = max(1, math.ceil(L2_ROTATE_BYTES / kv_bytes))
    g = torch.Generator(device="cuda").manual_seed(L + B)
    q = torch.randn(copies, B, 1, H_Q, D, device="cuda", generator=g).to(DTYPE)
    k = torch.randn(copies, B, 1, H_KV, D, device="cuda", generator=g).to(DTYPE)
    v = torch.randn(copies, B, 1, H_KV, D, device="cuda", generator=g).to(DTYPE)
    k_cache = torch.randn(copies, B, L, H_KV, D, device="cuda", generator=g).to(DTYPE)
    v_cache = torch.randn(copies, B, L, H_KV, D, device="cuda", generator=g).to(DTYPE)
    seq_lens = torch.full((B,), L - 1, dtype=torch.int32, device="cuda")
    # SDPA sees the same cache memory as (B, H, L, D) views; its q is (B, H_q, 1, D).
    qt = q.transpose(2, 3)
    kt, vt = k_cache.transpose(2, 3), v_cache.transpose(2, 3)
    scale = 1.0 / math.sqrt(D)
    n_calls, reps = copies * max(1, 8 // copies), 20

    flashcore.attention_with_kv_cache(q[0], k[0], v[0], k_cache[0], v_cache[0], seq_lens)  # append k[0] at L - 1
    want = sdpa(SDPBackend.FLASH_ATTENTION, qt[0], kt[0], vt[0], False).transpose(1, 2)
    # the copies as lists of views, so an eager call's time is flashcore's, not the indexing's
    qs, ks, vs, k_caches, v_caches = (list(t.unbind(0)) for t in (q, k, v, k_cache, v_cache))
    runs = {
        "flashcore": lambda i: flashcore.attention_with_kv_cache(
            qs[i % copies], ks[i % copies], vs[i % copies], k_caches[i % copies], v_caches[i % copies], seq_lens),
        "sdpa-flash": lambda i: sdpa(SDPBackend.FLASH_ATTENTION, qt[i % copies], kt[i % copies], vt[i % copies], False),
        "sdpa-cudnn": lambda i: sdpa(SDPBackend.CUDNN_ATTENTION, qt[i % copies], kt[i % copies], vt[i % copies], False),
    }
    for cfg, splits in sweep_configs:
        runs[f"flashcore {tuple(cfg)} splits={splits}"] = (lambda c, s: lambda i: ta._launch_decode(
            q[i % copies], k[i % copies], v[i % copies], k_cache[i % copies], v_cache[i % copies], seq_lens,
            scale, True, c, num_splits=s))(cfg, splits)
    rows = []
    for name, fn in runs.items():
        err = None
        if name.startswith("flashcore"):
            try:
                err = (fn(0).float() - want.float()).abs().max().item()
            except Exception as e:
                rows.append(dict(kind="decode", B=B, L=L, impl=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
        ms, eager_ms, eager_host_us, error = timed(fn, n_calls, reps)
        rows.append(dict(kind="decode", B=B, L=L, impl=name, ms=ms, eager_ms=eager_ms, eager_host_us=eager_host_us,
                         gbps=kv_bytes / ms / 1e6 if ms else None,
                         eager_gbps=kv_bytes / eager_ms / 1e6 if eager_ms else None,
                         max_diff_vs_sdpa_flash=err, error=error,
                         config=decode_config(B, L)._asdict(),
                         num_splits=ta._num_splits(B * H_KV, L, decode_config(B, L).block_n, num_sms())))
    return rows


def best(row, metric):
    """The graph-replay number, or the eager one where the backend could not be captured."""
    return row.get(metric) if row.get(metric) is not None else row.get("eager_" + metric)


def fmt(x, width=10):
    return f"{x:>{width}.0f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--sweep", action="store_true", help="also time other kernel configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA device")

    KC = ta.KernelConfig
    prefill_sweep = [KC(128, 64, 8, 3), KC(64, 64, 4, 2)] if args.sweep else []
    decode_sweep = [(KC(0, 64, 4, 4), None), (KC(0, 128, 4, 3), None), (KC(0, 64, 4, 3), 16)] if args.sweep else []
    rows = []
    for S in PREFILL_S:
        rows += prefill_cases(S, prefill_sweep)
        print(f"prefill S={S} done", file=sys.stderr)
    for B, L in DECODE:
        rows += decode_cases(B, L, decode_sweep)
        print(f"decode B={B} L={L} done", file=sys.stderr)

    props = torch.cuda.get_device_properties(0)
    meta = dict(device=props.name, sms=props.multi_processor_count,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv),
                prefill_config=ta._prefill_config(D, DTYPE, False)._asdict(),
                decode_config={f"B={B} L={L}": decode_config(B, L)._asdict() for B, L in DECODE})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)

    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}")
    print("bf16, H_q=32, H_kv=8, D=128; CUDA-graph replay (eager Python call in the last column)")
    print(f"{'shape':<34}{'unit':>8}{'flashcore':>10}{'sdpa-flash':>11}{'sdpa-cudnn':>11}{'fc eager':>10}{'host us':>9}")
    by = {}
    for r in rows:
        key = ("prefill", r["S"]) if r["kind"] == "prefill" else ("decode", r["B"], r["L"])
        by.setdefault(key, {})[r["impl"]] = r
    for key, impls in by.items():
        metric = "tflops" if key[0] == "prefill" else "gbps"
        label = f"causal prefill B=1 S={key[1]}" if key[0] == "prefill" else f"decode B={key[1]} cache {key[2]}"
        fc = impls["flashcore"]
        print(f"{label:<34}{'TFLOP/s' if metric == 'tflops' else 'GB/s':>8}{fmt(best(fc, metric))}"
              f"{fmt(best(impls['sdpa-flash'], metric), 11)}{fmt(best(impls['sdpa-cudnn'], metric), 11)}"
              f"{fmt(fc.get('eager_' + metric))}{fmt(fc.get('eager_host_us'), 9)}")
        for name, r in impls.items():
            if r.get("error"):
                print(f"    {name}: {r['error']}")
    if args.sweep:
        print("\nsweep (graph replay):")
        for key, impls in by.items():
            metric = "tflops" if key[0] == "prefill" else "gbps"
            for name, r in impls.items():
                if name.startswith("flashcore"):
                    print(f"  {str(key):<22}{name:<44}{fmt(r.get(metric))}  diff {r.get('max_diff_vs_sdpa_flash')}")


if __name__ == "__main__":
    main()

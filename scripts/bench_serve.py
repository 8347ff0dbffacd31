"""Load-test the OpenAI-compatible server: continuous batching against static batching.

For each number of concurrent clients (default 1, 8, 32, 128) every client sends requests one
after another (``--requests-per-client``), each a streamed /v1/completions call with a prompt of
random token ids (length uniform in ``--prompt-lens``) and ``max_tokens`` uniform in
``--output-lens``, greedy, with ``ignore_eos`` (as vLLM's benchmark with ``--ignore-eos``), so that
every request generates its ``max_tokens`` whatever the model, and runs of other checkpoints or
servers (``--model``, ``--url``) compare the same work. Measured: aggregate generated tok/s (all tokens of all requests over the
wall time of the level), time to first token p50/p99 and inter-token latency p50/p99 (gaps between
consecutive streamed chunks; ``tokens_per_chunk`` says how close that is to one token per chunk:
a token that ends inside a character or may begin a stop string sends no chunk of its own).
Each level also reports its busiest client's tokens and the run's wall time per such token: the
clients run a closed loop, so a level lasts at least that client's tokens, one step each, and a
wall time per busiest-client token near the inter-token latency means the level is bound by it.
``tok_s_all_busy`` is the rate while every client still has a request in flight (from the start
until the first client runs out of requests): the engine at that concurrency, without the tail
in which the last clients finish alone. ``tok_s_steady`` is the same rate from the moment every
client has received its first token (the opening burst of all clients' first prompts is prefilled)
until the first client runs out of requests: the engine's steady state at that concurrency, which
a run long enough (``--requests-per-client``) approaches; null when that window is empty.

``--score`` sends lm-evaluation-harness's log-likelihood requests instead: each a /v1/completions
call (not streamed) with ``echo``, ``logprobs: 1`` and ``max_tokens: 0``, whose prompt the server
scores token by token. Its ``tokens`` are then prompt tokens scored, ``tok_s`` their rate, its TTFT
the whole request's latency; there is no static baseline.

``--queue per-client`` (the default) gives each client its own list of requests;
``--queue shared`` puts all of a level's requests in one queue that every client takes its next
request from (what vLLM's ``benchmark_serving.py --max-concurrency N`` does): the same requests, but
no client is left with a long chain while the others are done.

The baseline is static batching in the same run: the same requests, in groups of the same
concurrency, each group one ``Llama.generate`` call run to its longest output (that is what a
server without continuous batching does); its tok/s counts only the tokens each request asked for.
Its TTFT is the group's prefill, its ITL the group's decode step.

Without ``--model`` a checkpoint with Llama-3.1-8B shapes and random bf16 weights is written
once to ``--workdir`` (about 16 GB, with a small Llama-3-style tokenizer from the tests). The server
runs as its own process (``python -m minillama.serve``), so the client's Python does not compete
with it. Usage on the GPU machine:

    PYTHONPATH=. python3 scripts/bench_serve.py --out bench_serve.json
    PYTHONPATH=. python3 scripts/bench_serve.py --url http://127.0.0.1:8000 --concurrency 64   # a running server
"""
import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))



def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder or repo id (default: random Llama-3.1-8B shapes)")
    p.add_argument("--workdir", default="/tmp/minillama-random-8b", help="where the random checkpoint is written")
    p.add_argument("--url", help="benchmark this running server instead of starting one (no static baseline)")
    p.add_argument("--concurrency", default="1,8,32,128", help="concurrent clients per level")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--queue", choices=("per-client", "shared"), default="per-client",
                   help="each client its own requests, or one queue of the level's requests for all clients")
    p.add_argument("--prompt-lens", default="128,1024", help="prompt length range (uniform)")
    p.add_argument("--output-lens", default="128,512", help="max_tokens range (uniform)")
    p.add_argument("--max-batch", type=int, default=None, help="server cache rows (default: the largest level)")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--no-static", action="store_true", help="skip the static-batching baseline")
    p.add_argument("--score", action="store_true",
                   help="lm-eval's log-likelihood requests (echo, logprobs 1, max_tokens 0): prompt tokens scored")
    p.add_argument("--vocab", type=int, default=128000, help="prompt ids are drawn below this (with --url)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_serve.json")
    return p.parse_args()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def write_random_checkpoint(folder: Path) -> Path:
    """Llama-3.1-8B shapes, random bf16 weights (drawn on the GPU), one safetensors file per layer."""
    import torch
    from safetensors.torch import save_file

    from tests.checkpoints import write_llama3_tokenizer

    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    from llama31_shapes import LLAMA31_8B  # scripts/, beside this file
    from minillama.config import LlamaConfig

    c = LLAMA31_8B
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, mean=0.0):
        return torch.empty(shape, dtype=torch.bfloat16, device="cuda").normal_(mean, 0.02, generator=gen).cpu()

    weight_map = {}
    files = {"embed.safetensors": {"model.embed_tokens.weight": rand(c["vocab_size"], h),
                                   "lm_head.weight": rand(c["vocab_size"], h), "model.norm.weight": rand(h, mean=1)}}
    for layer in range(c["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        files[f"layer{layer:02d}.safetensors"] = {
            pre + "self_attn.q_proj.weight": rand(q, h), pre + "self_attn.k_proj.weight": rand(kv, h),
            pre + "self_attn.v_proj.weight": rand(kv, h), pre + "self_attn.o_proj.weight": rand(h, q),
            pre + "mlp.gate_proj.weight": rand(i, h), pre + "mlp.up_proj.weight": rand(i, h),
            pre + "mlp.down_proj.weight": rand(h, i),
            pre + "input_layernorm.weight": rand(h, mean=1), pre + "post_attention_layernorm.weight": rand(h, mean=1),
        }
    for name, tensors in files.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(LlamaConfig(**LLAMA31_8B).to_dict(), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}))
    write_llama3_tokenizer(folder)
    (folder / "done").write_text("")
    return folder


def workload(args, clients: int, vocab_high: int):
    """Per client, its requests: (prompt ids, max_tokens). Ids avoid the special tokens. With
    ``--score`` every max_tokens is 0."""
    rng = random.Random(args.seed * 1000 + clients)
    low = 1000 if vocab_high > 2000 else 3
    p_lo, p_hi = map(int, args.prompt_lens.split(","))
    o_lo, o_hi = map(int, args.output_lens.split(","))
    return [[([rng.randrange(low, vocab_high) for _ in range(rng.randint(p_lo, p_hi))],
              0 if args.score else rng.randint(o_lo, o_hi))
             for _ in range(args.requests_per_client)] for _ in range(clients)]


async def one_request(client, url, prompt, max_tokens, record, score=False):
    if score:  # the prompt's log-likelihood, as lm-eval asks for it
        body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
        start = time.perf_counter()
        r = await client.post(url + "/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]!r}")
        done = time.perf_counter()
        record.append({"ttft": done - start, "gaps": [], "tokens": r.json()["usage"]["prompt_tokens"], "chunks": 1,
                       "chunk_times": [done]})
        return
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                if c["text"]:
                    times.append(time.perf_counter())
    record.append({"ttft": times[0] - start if times else None, "gaps": [b - a for a, b in zip(times, times[1:])],
                   "tokens": usage["completion_tokens"], "chunks": len(times), "chunk_times": times})


async def run_level(url, requests, queue="per-client", score=False):
    """Run one level: ``requests`` holds each client's list; with ``queue="shared"`` the clients
    instead take their next request from one queue of all of them, in round order; ``score``: the
    requests are log-likelihood requests (--score)."""
    import httpx

    record = []
    shared = [item for items in zip(*requests) for item in items]  # round k of every client, then round k+1
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def one_client(items):
            mine = []
            while True:
                if queue == "shared":
                    if not shared:
                        break
                    prompt, max_tokens = shared.pop(0)
                elif len(mine) < len(items):
                    prompt, max_tokens = items[len(mine)]
                else:
                    break
                await one_request(client, url, prompt, max_tokens, mine, score)
            record.extend(mine)
            first_token = mine[0]["chunk_times"][0] if mine and mine[0]["chunk_times"] else None
            return sum(r["tokens"] for r in mine), time.perf_counter(), first_token

        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(items) for items in requests))
        wall = time.perf_counter() - start
    gaps = [g for r in record for g in r["gaps"]]
    ttfts = [r["ttft"] for r in record if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in record)
    chunks = sum(r["chunks"] for r in record)
    all_busy_end = min(done for _, done, _ in per_client)  # the first client out of requests
    chunks_all_busy = sum(t <= all_busy_end for r in record for t in r["chunk_times"])
    # steady state: from the moment every client has its first token (the opening burst of
    # prompts is prefilled) until the first client runs out of requests
    firsts = [first for _, _, first in per_client]
    steady_start = max(firsts) if all(f is not None for f in firsts) else None
    steady_s = max(0.0, all_busy_end - steady_start) if steady_start is not None else 0.0
    chunks_steady = sum(steady_start <= t <= all_busy_end for r in record for t in r["chunk_times"]) if steady_s > 0 else 0
    busiest = max(n for n, _, _ in per_client)
    return {"queue": queue, "requests": len(record), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            # streamed chunks (tokens_per_chunk tokens each) until the first client ran out of requests
            "all_busy_s": all_busy_end - start,
            "tok_s_all_busy": chunks_all_busy * tokens / max(1, chunks) / (all_busy_end - start),
            "steady_s": steady_s,
            "tok_s_steady": chunks_steady * tokens / max(1, chunks) / steady_s if steady_s > 0 else None,
            "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p99_ms": 1000 * percentile(ttfts, 99),
            "itl_p50_ms": 1000 * percentile(gaps, 50) if gaps else None,
            "itl_p99_ms": 1000 * percentile(gaps, 99) if gaps else None,
            "tokens_per_chunk": tokens / max(1, chunks),
            # each client sends its requests one after the other: the run lasts at least as long as
            # its busiest client's tokens, one step each (the closed loop's bound on tok/s)
            "busiest_client_tokens": busiest,
            "wall_ms_per_busiest_client_token": 1000 * wall / max(1, busiest)}


def run_static(llm, requests):
    """The same requests in groups of len(requests), one Llama.generate call per group."""
    import torch

    flat = [item for items in zip(*requests) for item in items]  # round k of every client, then round k+1
    size = len(requests)
    useful, ttfts, steps = 0, [], []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for g in range(0, len(flat), size):
        group = flat[g: g + size]
        results = llm.generate([p for p, _ in group], max_new_tokens=max(m for _, m in group), temperature=0.0,
                               ignore_eos=True)
        useful += sum(min(len(r.token_ids), m) for r, (_, m) in zip(results, group))
        ttfts += [r.prefill_s for r in results]
        longest = max(results, key=lambda r: r.decode_steps)
        if longest.decode_steps:
            steps.append(longest.decode_s / longest.decode_steps)
    wall = time.perf_counter() - start
    return {"requests": len(flat), "tokens": useful, "wall_s": wall, "tok_s": useful / wall,
            "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p99_ms": 1000 * percentile(ttfts, 99),
            "step_p50_ms": 1000 * percentile(steps, 50)}


def start_server(model, max_batch, max_seq_len, prefill_chunk):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "minillama.serve", "--model", str(model), "--port", str(port),
           "--max-batch", str(max_batch), "--max-seq-len", str(max_seq_len), "--max-queue", "1024",
           "--prefill-chunk", str(prefill_chunk), "--request-timeout", "3600"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep carried packages
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("the server did not start in 15 minutes")


def main():
    args = parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    p_hi, o_hi = int(args.prompt_lens.split(",")[1]), int(args.output_lens.split(",")[1])
    results = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "levels": {}}
    vocab_high = args.vocab
    proc = None
    if args.url:
        url = args.url
    else:
        import torch

        from minillama.hub import resolve_checkpoint
        from minillama.tokenizer import Tokenizer

        model = args.model or write_random_checkpoint(Path(args.workdir))
        vocab_high = min(128000, Tokenizer.from_dir(resolve_checkpoint(model)).vocab_size)
        results["model"] = args.model or "random Llama-3.1-8B shapes, bf16"
        results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        if not (args.no_static or args.score):
            from minillama import Llama

            llm = Llama.from_pretrained(model)
            llm.generate([[1000] * 64], max_new_tokens=8)  # warm-up (compilation, graphs)
            for level in levels:
                static = run_static(llm, workload(args, level, vocab_high))
                results["levels"].setdefault(str(level), {})["static"] = static
                log(f"static  {level:4d} clients: {static['tok_s']:8.0f} tok/s, TTFT p50 {static['ttft_p50_ms']:.0f} ms, "
                    f"step p50 {static['step_p50_ms']:.1f} ms")
            del llm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        proc, url = start_server(model, args.max_batch or max(levels), p_hi + o_hi, args.prefill_chunk)
    try:
        # warm-up: clients arriving one by one take rows 1, 2, ... so the runner captures the graph
        # of every batch bucket (and tunes its GEMV) before anything is timed
        o_lo = int(args.output_lens.split(",")[0])
        warm = [[(prompt[:16], min(24, o_lo)) for prompt, _ in items[:1]]
                for items in workload(args, max(levels), vocab_high)]
        asyncio.run(run_level(url, warm))
        if args.score:  # and a first pass of the scoring requests, so steps that recur replay graphs
            asyncio.run(run_level(url, workload(args, max(levels), vocab_high), args.queue, score=True))
        for level in levels:
            served = asyncio.run(run_level(url, workload(args, level, vocab_high), args.queue, args.score))
            results["levels"].setdefault(str(level), {})["continuous"] = served
            if args.score:
                log(f"scored  {level:4d} clients: {served['tok_s']:8.0f} prompt tok/s over {served['wall_s']:.1f} s, "
                    f"latency p50/p99 {served['ttft_p50_ms']:.0f}/{served['ttft_p99_ms']:.0f} ms")
                Path(args.out).write_text(json.dumps(results, indent=2))
                continue
            steady = f"{served['tok_s_steady']:.0f}" if served["tok_s_steady"] else "-"
            log(f"served  {level:4d} clients: {served['tok_s']:8.0f} tok/s ({served['tok_s_all_busy']:.0f} while all "
                f"were busy, {served['all_busy_s']:.1f} s of {served['wall_s']:.1f}; steady {steady} over "
                f"{served['steady_s']:.1f} s), TTFT p50/p99 {served['ttft_p50_ms']:.0f}/"
                f"{served['ttft_p99_ms']:.0f} ms, ITL p50/p99 {served['itl_p50_ms']:.1f}/{served['itl_p99_ms']:.1f} ms "
                f"({served['tokens_per_chunk']:.2f} tokens per chunk; busiest client {served['busiest_client_tokens']} "
                f"tokens, {served['wall_ms_per_busiest_client_token']:.1f} ms of the run each)")
            Path(args.out).write_text(json.dumps(results, indent=2))
        import httpx

        results["server_stats"] = httpx.get(url + "/health").json()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results["levels"], indent=2))


if __name__ == "__main__":
    main()

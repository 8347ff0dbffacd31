"""Decode and prefill speed of 8-bit weights (int8, fp8) against bf16, on the GPU.

    PYTHONPATH=. python3 scripts/bench_quant.py --out bench_quant.json            # Llama-3.1-8B shapes, random
    PYTHONPATH=. python3 scripts/bench_quant.py --shape 70b --formats fp8,int8    # 70B on one GPU
    PYTHONPATH=. python3 scripts/bench_quant.py --model /path/to/Llama-3.1-8B-Instruct --formats bf16,fp8
    PYTHONPATH=. python3 scripts/bench_quant.py --matmul-8bit triton,dequantize,scaled_mm
    PYTHONPATH=. python3 scripts/bench_quant.py --formats bf16,fp8,fp8+head --batches 1  # lm_head in 8 bits too

For each weight format (bf16; int8 and fp8, one scale per output channel; "int8+head" and
"fp8+head" quantize lm_head too, as ``quantize_lm_head=True`` does) and each multi-row
8-bit matmul (``TritonBackend(matmul_8bit=...)``), on the Triton backend:

  * decode: seconds per step at batch 1 and 16 (cache fill 512) through the Runner's CUDA graphs
    and the generate loop's greedy pick (``sampling.sample``), steps back to back,
    tok/s, and the achieved weight bandwidth (bytes of every matrix but the embedding table,
    8-bit weights + their float32 scales, per step / step time); and the tok/s of the generate
    loop itself (``TokenLoop``: prompts of the fill's length, the host reading each step's ids);
  * TTFT: a 512- and a 2048-token prefill (median of --reps after an eager one and a capture,
    both untimed; the eager one's time is reported too);
  * weight memory (GB).

Random weights (default) of Llama-3.1-8B's or 70B's shapes are made directly in each format;
--model loads a checkpoint instead (quantized while loading). Prints a table and writes the JSON
to --out.
"""
import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # llama31_shapes, also when loaded by path

import torch  # noqa: E402

from minillama.backend import MATMUL_8BIT, TritonBackend  # noqa: E402
from minillama.config import LlamaConfig  # noqa: E402
from minillama.generate import TokenLoop  # noqa: E402
from minillama.model import Transformer, rope_inv_freq  # noqa: E402
from minillama.quantization import quantize_model  # noqa: E402
from minillama.runner import Runner  # noqa: E402
from minillama.sampling import SamplingParams, sample  # noqa: E402
from llama31_shapes import LLAMA31_70B, LLAMA31_8B  # noqa: E402

GREEDY = SamplingParams()  # temperature 0
# weight format -> (quantize, quantize_lm_head)
FORMATS = {"bf16": (None, False), "int8": ("int8", False), "fp8": ("fp8", False),
           "int8+head": ("int8", True), "fp8+head": ("fp8", True)}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=512)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (default: random weights, Llama-3.1-8B shapes)")
    p.add_argument("--shape", default="8b", choices=("8b", "70b"), help="random weights of Llama-3.1-8B or -70B")
    p.add_argument("--formats", default="bf16,int8,fp8",
                   help="of bf16, int8, fp8, int8+head, fp8+head (lm_head in 8 bits too); "
                        "70b on one GPU: 8-bit only (bf16 does not fit)")
    p.add_argument("--matmul-8bit", default="triton,dequantize,scaled_mm",
                   help=f"multi-row 8-bit matmuls to compare, of {MATMUL_8BIT}")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--prompt-lens", default="512,2048")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="bench_quant.json")
    p.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script (Triton interpreter)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    return p.parse_args(argv)


def build(args, fmt: str) -> Transformer:
    """The model in weight format ``fmt`` ("bf16", "int8", "fp8"; "+head": lm_head too): a checkpoint
    (quantized while loading), or random weights made directly in that format (a 70B model in 8 bits
    fits one H200; its bf16 weights would not)."""
    if fmt not in FORMATS:
        raise SystemExit(f"--formats: unknown format {fmt!r}; use some of {', '.join(FORMATS)}")
    quantize, lm_head = FORMATS[fmt]
    if args.model:
        from minillama import Llama

        return Llama.from_pretrained(args.model, device=args.device, dtype=torch.bfloat16, backend="triton",
                                     quantize=quantize, quantize_lm_head=lm_head).model
    config = LlamaConfig(**(TINY if args.tiny else LLAMA31_70B if args.shape == "70b" else LLAMA31_8B))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32  # the interpreter needs float32
    with torch.device("meta"):
        model = Transformer(config, TritonBackend()).to(dtype)
        if quantize:
            quantize_model(model, quantize, lm_head)  # on the meta device: swaps the 8-bit layers in, allocates nothing
    model.to_empty(device=args.device)
    model.tie_weights()
    gen = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():  # random values, never zeros: they can time faster than data
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.05, generator=gen)
            elif name.endswith("weight_scale"):
                p.fill_(0.02 / 64)
            elif p.dtype == torch.int8:
                p.copy_(torch.randint(-127, 128, p.shape, device=p.device, dtype=torch.int8, generator=gen))
            elif p.dtype == torch.float8_e4m3fn:
                p.copy_(torch.empty(p.shape, device=p.device, dtype=dtype).normal_(0.0, 64.0, generator=gen)
                        .clamp_(-448.0, 448.0))
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.inv_freq = rope_inv_freq(config).to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def streamed_bytes(model: Transformer) -> int:
    """Bytes a decode step reads from the weights: every parameter but the embedding table."""
    embed = model.tok_embeddings.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed) + (
        embed.numel() * embed.element_size() if model.config.tie_word_embeddings else 0)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_step_s(runner: Runner, batch: int, fill: int, steps: int) -> float:
    cache = runner.new_cache(batch, fill + steps + 2)
    cache.k.normal_()
    cache.v.normal_()
    tokens = torch.randint(0, runner.config.vocab_size, (batch, 1), device=runner.device)
    per_step = []
    for rep in range(4):  # the first pass captures the graph: not timed
        cache.set_lengths([fill] * batch)
        sync(runner.device)
        start = time.perf_counter()
        for _ in range(steps if rep else 2):
            logits = runner(tokens, cache)
            cache.advance(1)
            tokens = sample(logits[:, -1], GREEDY)[:, None]  # as generate picks greedily
        sync(runner.device)
        if rep:
            per_step.append((time.perf_counter() - start) / steps)
    return statistics.median(per_step)


def loop_step_s(runner: Runner, batch: int, fill: int, steps: int) -> float:
    """Seconds per decode step of the generate loop (``TokenLoop``, greedy, no stop ids): prompts of
    ``fill`` random tokens, ``steps`` new tokens (at least 2), median of 3 runs after one that
    captures the graphs of its cache."""
    steps = max(steps, 2)
    cache = runner.new_cache(batch, fill + steps)
    prompts = [torch.randint(0, runner.config.vocab_size, (fill,), generator=torch.Generator().manual_seed(b)).tolist()
               for b in range(batch)]
    per_step = []
    for rep in range(4):
        cache.set_lengths([0] * batch)
        loop = TokenLoop(runner, prompts, steps, cache=cache)
        for _ in loop:
            pass
        if rep:
            per_step.append(loop.times.decode_s / loop.times.decode_steps)
    return statistics.median(per_step)


def prefill_s(runner: Runner, length: int, reps: int):
    """(median seconds of ``reps`` prefills of ``length`` tokens, seconds of the first, eager one).

    As ``bench.py`` times TTFT: one cache, two untimed prefills first: the first of a length runs
    eagerly, the second captures the CUDA graph of its bucket, which the timed ones replay."""
    cache = runner.new_cache(1, length + 1)
    last = torch.tensor([length - 1], device=runner.device)
    times = []
    for r in range(reps + 2):
        tokens = torch.randint(0, runner.config.vocab_size, (1, length),
                               generator=torch.Generator().manual_seed(r)).to(runner.device)
        cache.set_lengths([0])
        sync(runner.device)
        start = time.perf_counter()
        runner(tokens, cache, logits_at=last)
        sync(runner.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]), times[0]


def set_backend(model: Transformer, backend) -> None:
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend


def main(argv=None) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    prompt_lens = [int(n) for n in args.prompt_lens.split(",")]
    rows = []
    for fmt in args.formats.split(","):
        model = build(args, fmt)
        for variant in ["-"] if fmt == "bf16" else args.matmul_8bit.split(","):
            set_backend(model, TritonBackend() if variant == "-" else TritonBackend(matmul_8bit=variant))
            runner = Runner(model)
            weight_bytes = streamed_bytes(model)
            row = {"format": fmt, "matmul_8bit": variant, "weights_gb": weight_bytes / 1e9}
            with torch.inference_mode():
                for b in batches:
                    s = decode_step_s(runner, b, args.cache_len, args.steps)
                    row[f"decode_b{b}_tok_s"] = b / s
                    row[f"decode_b{b}_weight_gb_s"] = weight_bytes / s / 1e9
                    row[f"decode_b{b}_loop_tok_s"] = b / loop_step_s(runner, b, args.cache_len, args.steps)
                for n in prompt_lens:
                    replayed, eager = prefill_s(runner, n, args.reps)
                    row[f"ttft_{n}_ms"] = 1000 * replayed
                    row[f"ttft_{n}_eager_ms"] = 1000 * eager
            row["gemv_settings"] = {  # what Runner.tune_gemv picked for each matrix kind, and what it timed
                role: dict(config=str(calls[0][0].gemv_config), fuse_norm=calls[0][0].fuse_norm,
                           norm_next=calls[0][0].norm_next) for role, calls in runner.gemv_roles().items()}
            row["gemv_timings_us"] = {name: {k: v * 1e3 for k, v in times.items()}
                                      for name, times in (runner.gemv_timings or {}).items()}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "gemv_timings_us"}), flush=True)
            runner.clear()
        del model, runner
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    keys = [k for k in rows[0] if k not in ("format", "matmul_8bit", "gemv_settings", "gemv_timings_us")]
    print("format matmul_8bit " + " ".join(keys))
    for r in rows:
        print(f"{r['format']:<6} {r['matmul_8bit']:<10} " + " ".join(f"{r[k]:.1f}" for k in keys))
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "model": args.model or ("random tiny" if args.tiny else f"random Llama-3.1-{args.shape.upper()}")}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

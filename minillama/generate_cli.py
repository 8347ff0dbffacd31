"""Generate text for one or more prompts with minillama: ``minillama-generate`` (installed), or
``python scripts/generate.py`` from a clone.

    minillama-generate "Once upon a time" "One day, Lily found"   # the bundled demo model
    minillama-generate --model meta-llama/Llama-3.1-8B "The capital of France is"
    minillama-generate --prompt-file prompts.jsonl --json --batch-size 8 > out.jsonl
    minillama-generate --stream --temperature 0.8 --top-p 0.95 --seed 1 "Once upon a time"

Prompts run as one batch (``--batch-size`` splits them into chunks). Each completion is printed
after its prompt, or, with ``--json``, one JSON object per prompt per line. Timing goes to stderr:
prompt tokens, time to first token, decode tokens/s per sequence and for the whole batch.

Errors are one line on stderr with exit status 2; Ctrl-C exits 130; a closed output pipe (``| head``)
ends the run quietly (status 141), as ``cat`` does. See ``minillama/cli.py``.
"""
import argparse
import json
import sys
from pathlib import Path

from minillama import cli
from minillama.hub import DEMO_MODEL_DIR


class UserError(cli.CommandError):
    """Bad input: reported as one line on stderr, exit status 2."""


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="prompt texts (or use --prompt-file)")
    p.add_argument("--model", help=f"local folder or hub repo id (default: the bundled demo model, {DEMO_MODEL_DIR})")
    p.add_argument("--prompt-file", help="one prompt per line; a .jsonl file holds one object with a 'prompt' per line")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: all in one)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 turns it off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 turns it off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 turns it off")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="in [-2, 2], subtracted from the logits of the tokens generated so far (0: off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="in [-2, 2], times how often each token was generated so far (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0, for the tokens of the prompt and the output (1: off; 1.1-1.3 is usual)")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="new tokens before the checkpoint's EOS ids may end a completion or a --stop string end "
                        "in their text (0: off; at most --max-new-tokens)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="the checkpoint's EOS ids end nothing: run to --max-new-tokens or a --stop string (an EOS "
                        "is then text, such as </s> or <|eot_id|>)")
    p.add_argument("--skip-special-tokens", action="store_true",
                   help="leave the text of special tokens the model writes (<|python_tag|>, an EOS under "
                        "--ignore-eos) out of the output; their ids stay in --json's token_ids")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut from the text")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                   help="kernels: triton (fused kernels, CUDA graphs), torch (plain PyTorch); auto: triton on CUDA")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel degree: run N processes (one per GPU) through torch's launcher; "
                        "under torchrun, the number of processes")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: the checkpoint's on the GPU, float32 on the CPU")
    cli.add_quantize_arguments(p)
    args = p.parse_args(argv)
    cli.check_quantize_arguments(p, args)
    args.prompts = [cli.text_arg(t) for t in args.prompts]  # bytes that are not UTF-8 become U+FFFD
    args.stop = [cli.text_arg(t) for t in args.stop]
    return args


def read_prompts(args) -> list:
    prompts = list(args.prompts)
    if args.prompt_file:
        path = Path(args.prompt_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt-file {path}: {e}") from None
        if path.suffix == ".jsonl":
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n} is not valid JSON: {e}") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise UserError(f"{path}:{n} has no string field 'prompt'")
                prompts.append(record["prompt"])
        else:
            prompts.extend(line for line in lines if line.strip())
    if not prompts:
        raise UserError("no prompts: pass prompt texts as arguments or --prompt-file FILE")
    return prompts


def check_args(args, prompts) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.stream and len(prompts) != 1:
        raise UserError(f"--stream takes one prompt, got {len(prompts)}")
    if args.stream and args.json:
        raise UserError("--stream and --json do not go together; pick one")


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=args.stop,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens, ignore_eos=args.ignore_eos)


def report(results, batch_index: int, n_batches: int) -> str:
    """One stderr line of timing for a batch."""
    prompt_tokens = sum(len(r.prompt_ids) for r in results)
    new_tokens = sum(len(r.token_ids) for r in results)
    ttft = results[0].prefill_s
    rates = [r.decode_steps / r.decode_s for r in results if r.decode_steps and r.decode_s > 0]
    batch_decode_s = max(r.decode_s for r in results)
    steps = sum(r.decode_steps for r in results)
    per_seq = f"{sum(rates) / len(rates):.1f} tok/s per sequence" if rates else "no decode steps"
    aggregate = f", {steps / batch_decode_s:.1f} tok/s aggregate" if batch_decode_s > 0 else ""
    where = f"batch {batch_index + 1}/{n_batches}: " if n_batches > 1 else ""
    return (f"[{where}{len(results)} prompt(s), {prompt_tokens} prompt tokens, {new_tokens} new tokens; "
            f"time to first token {ttft * 1e3:.1f} ms; decode {per_seq}{aggregate}]")


def checked_prompts(args) -> list:
    """The prompts, after every check that needs no model (flags, prompt file, sampling, stop strings)."""
    prompts = read_prompts(args)
    check_args(args, prompts)
    from minillama.api import check_sampling_args  # imports torch: after the cheap checks

    check_sampling_args(**sampling_kwargs(args))
    return prompts


def run(args) -> None:
    prompts = checked_prompts(args)
    model = args.model
    if model is None:
        if not (DEMO_MODEL_DIR / "config.json").exists():
            raise UserError(f"the bundled demo model is not installed ({DEMO_MODEL_DIR} has no config.json); "
                            f"pass --model PATH_OR_REPO_ID")
        model = DEMO_MODEL_DIR

    from minillama import Llama  # after argument checks: importing torch takes a while

    llm = Llama.from_pretrained(model, device=args.device, dtype=args.dtype, backend=args.backend, tp=args.tp,
                                progress=cli.load_progress(), quantize=args.quantize,
                                quantize_lm_head=args.quantize_lm_head)
    if args.stream:
        stream = llm.stream(prompts[0], **sampling_kwargs(args), skip_special_tokens=args.skip_special_tokens)
        cli.write(prompts[0], flush=True)
        for delta in stream:
            cli.write(delta, flush=True)
        cli.write("\n", flush=True)
        cli.note(report([stream.result], 0, 1))
        return
    encoded = []  # every prompt fits before any batch runs
    for n, prompt in enumerate(prompts, 1):
        try:
            encoded.append(llm._prompt_ids(prompt, decodable=True))
            llm._check_length(len(encoded[-1]), args.max_new_tokens)
        except ValueError as e:
            raise UserError(f"prompt {n}: {e}") from None
    size = args.batch_size or len(prompts)
    batches = [range(i, min(i + size, len(prompts))) for i in range(0, len(prompts), size)]
    for k, batch in enumerate(batches):
        results = llm.generate([encoded[j] for j in batch], **sampling_kwargs(args),
                               skip_special_tokens=args.skip_special_tokens)
        for i, (prompt, r) in enumerate(zip([prompts[j] for j in batch], results)):
            if args.json:
                cli.write(json.dumps({
                    "prompt": prompt,
                    "prompt_token_ids": r.prompt_ids,
                    "token_ids": r.token_ids,
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                    "stop": r.stop,
                    "timing": {
                        "time_to_first_token_s": r.prefill_s,
                        "decode_s": r.decode_s,
                        "decode_tokens_per_s": r.decode_steps / r.decode_s if r.decode_s > 0 else None,
                    },
                }, ensure_ascii=False) + "\n")
            else:
                if k or i:
                    cli.write("\n")  # a blank line between completions
                cli.write(prompt + r.text + "\n")
        cli.write("", flush=True)
        cli.note(report(results, k, len(batches)))


def main(argv=None) -> int:
    """Exit status: 0, or 2 after a one-line error (bad input, or the library's answer to it:
    a missing model, a prompt that does not fit, ...), 130 on Ctrl-C, 141 when stdout's reader left."""
    def _main(argv) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parse_args(argv)
        if args.tp is not None and args.tp < 1:
            raise UserError(f"--tp must be >= 1, got {args.tp}")
        from minillama.parallel import launched_by_torchrun

        if args.tp and args.tp > 1 and not launched_by_torchrun():
            checked_prompts(args)  # what needs no model fails before the processes start
            return cli.launch_tensor_parallel(args.tp, args.model or DEMO_MODEL_DIR, ["-m", "minillama.generate_cli"],
                                              cli.without_tp(argv))
        cli.silence_followers()
        run(args)
        return 0

    return cli.run(_main, argv)


if __name__ == "__main__":
    cli.exit_with(main())

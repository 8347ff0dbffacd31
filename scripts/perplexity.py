"""Perplexity of checkpoints on held-out text, in full precision and with 8-bit weights.

    python scripts/perplexity.py                                   # the bundled demo model
    python scripts/perplexity.py --model ../shared/fixtures/stories260K-hf --quantize none int8 fp8
    python scripts/perplexity.py --quantize none int8+head fp8+head   # lm_head in 8 bits too
    python scripts/perplexity.py --model A --model B --json ppl.json

Each paragraph of the text (blank-line separated) is one document: BOS + its tokens, scored in
windows of at most the model's context (each window after the first starts again with BOS and
only its own tokens are scored). Perplexity is exp(total NLL / scored tokens) over all documents,
from ``Llama.logits`` (one full forward per window, float32 logits, log-softmax in float64).
The default text, ``scripts/heldout_stories.txt``, was written for this purpose and is in
neither model's training data. Prints a table; ``--json`` also writes the rows.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

import torch  # noqa: E402

from minillama import Llama, cli  # noqa: E402
from minillama.hub import DEMO_MODEL_DIR  # noqa: E402

DEFAULT_TEXT = Path(__file__).resolve().parent / "heldout_stories.txt"


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help=f"folder or hub repo id, repeatable (default: {DEMO_MODEL_DIR})")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text; paragraphs are documents")
    p.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8", "fp8", "int8+head", "fp8+head"],
                   help="weight formats to measure (none: the checkpoint as it is)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: the checkpoint's on the GPU, float32 on the CPU")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def documents(text: str):
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def perplexity(llm: Llama, docs) -> dict:
    """{'tokens': scored tokens, 'nll': mean negative log-likelihood (nats), 'ppl': exp(nll)}."""
    window = llm.config.max_position_embeddings
    bos = llm.tokenizer.bos_id
    if bos is None or window < 2:  # each window is BOS + at least one scored token
        raise ValueError(f"perplexity scores each window after a BOS token: this model's tokenizer has "
                         f"{'no BOS' if bos is None else 'a BOS'} and a context of {window} tokens (needs a BOS and >= 2)")
    total, count = 0.0, 0
    for doc in docs:
        ids = llm.tokenizer.encode(doc, bos=False)
        start = 0
        while start < len(ids):
            chunk = ids[start:start + window - 1]  # BOS + chunk fits the context
            seq = [bos] + chunk
            logits = llm.logits(seq).double()  # (len, V)
            logp = torch.log_softmax(logits[:-1], dim=-1)
            target = torch.tensor(seq[1:], device=logp.device)
            total -= logp.gather(1, target[:, None]).sum().item()
            count += len(chunk)
            start += len(chunk)
    return {"tokens": count, "nll": total / count, "ppl": math.exp(total / count)}


def main(argv=None) -> int:
    """Exit status: 0, or 2 after a one-line error (bad text, model or device), 130 on Ctrl-C."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    text_path = Path(args.text)
    try:
        text = text_path.read_text(encoding="utf-8")
    except OSError as e:
        raise cli.CommandError(f"cannot read --text {text_path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise cli.CommandError(f"--text {text_path} is not UTF-8 (byte {e.start}: {e.reason})") from None
    docs = documents(text)
    if not docs:
        raise cli.CommandError(f"--text {text_path} holds no text to score (paragraphs are separated by blank lines)")
    rows = []
    for model in args.model or [str(DEMO_MODEL_DIR)]:
        base = None
        for q in args.quantize:
            kwargs = {} if q == "none" else {"quantize": q.removesuffix("+head"),
                                             "quantize_lm_head": q.endswith("+head")}
            llm = Llama.from_pretrained(model, device=args.device, dtype=args.dtype, **kwargs)
            r = perplexity(llm, docs)
            if q == "none":
                base = r["ppl"]
            rows.append({"model": model, "quantize": q, "device": str(llm.device),
                         "dtype": str(llm.dtype).removeprefix("torch."), **r,
                         "delta_pct": None if base is None else 100 * (r["ppl"] / base - 1)})
    width = max(len(Path(r["model"]).name) for r in rows)
    print(f"{'model':<{width}}  quantize   device  dtype     tokens  nll/token  perplexity  vs none")
    for r in rows:
        delta = "" if r["delta_pct"] is None else f"{r['delta_pct']:+.3f}%"
        print(f"{Path(r['model']).name:<{width}}  {r['quantize']:<9}  {r['device']:<6}  {r['dtype']:<8}  "
              f"{r['tokens']:>6}  {r['nll']:>9.5f}  {r['ppl']:>10.4f}  {delta}")
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(), "text": os.path.relpath(text_path),
                "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "documents": len(docs)}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    cli.exit_with(main())

"""Train the small demo model that ships in ``minillama/demo_model/``, on the CPU, deterministically.

Steps: generate the story corpus (``demo_corpus.py``, seeded), train a SentencePiece BPE tokenizer
on it (Llama-2 ids: 0 <unk>, 1 <s>, 2 </s>; byte fallback), pack the tokenized documents into rows
that each start at a document, and train minillama's own ``Transformer`` (the inference model, with
no cache: training mode) with AdamW, warmup + cosine learning rate and gradient clipping. The folder
is written in Hugging Face format through ``minillama.weights.save_checkpoint``, plus the tokenizer
files and generation_config.json.

Conversations use Llama 2's chat format (Meta's ``chat_completion``; the chat template written to
tokenizer_config.json is Hugging Face's Llama 2 template): ``<s>[INST] {user} [/INST] {assistant} </s>``
per exchange, a system message wrapped in ``<<SYS>>\\n...\\n<</SYS>>\\n\\n`` at the front of the first
user message. The corpus is encoded by minillama's own tokenizer and chat encoder, read back from
the written folder, so training sees exactly the ids that inference produces.

The same arguments and thread count give the same weights, bit for bit.

    python scripts/train_demo.py --out minillama/demo_model --threads 2
"""
import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from demo_corpus import documents  # noqa: E402
from minillama.config import LlamaConfig  # noqa: E402
from minillama.model import Transformer  # noqa: E402
from minillama.tokenizer import Tokenizer  # noqa: E402
from minillama.weights import save_checkpoint  # noqa: E402

# Hugging Face's Llama 2 chat template (written to tokenizer_config.json).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
BOS, EOS = 1, 2


def corpus_text(doc) -> str:
    """The text a document contributes to tokenizer training (the chat markers are left out)."""
    return doc if isinstance(doc, str) else " ".join(m["content"] for m in doc)


def train_tokenizer(docs, vocab_size: int) -> bytes:
    """A SentencePiece BPE model with Llama 2's settings and ids, as serialized bytes."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(corpus_text(d) for d in docs),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"],
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=1.0,
        max_sentence_length=8192,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def encode_document(tokenizer: Tokenizer, doc) -> list:
    """A story as ``<s> text </s>``; a conversation through the chat template, as minillama's chat
    encodes it at inference time (Llama 2: ``<s>[INST] user [/INST] answer </s>`` per exchange)."""
    if isinstance(doc, str):
        return tokenizer.encode(doc, bos=True) + [EOS]
    return tokenizer.encode_chat(doc, add_generation_prompt=False)


def pack_rows(token_docs, row_len: int) -> torch.Tensor:
    """Rows of ``row_len`` tokens; each starts at a document and runs on into the next ones.

    The tail of the document that crosses a row's end is dropped, so every row begins with <s>.
    """
    rows, row = [], []
    for ids in token_docs:
        row += ids
        if len(row) >= row_len:
            rows.append(row[:row_len])
            row = []
    return torch.tensor(rows, dtype=torch.long)


def init_weights(model: Transformer, n_layers: int) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)."""
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(p, mean=0.0, std=std)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def write_tokenizer_files(folder: Path, sp_model: bytes, context: int) -> None:
    (folder / "tokenizer.model").write_bytes(sp_model)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        **specials,
        "pad_token": None,
        "model_max_length": context,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    generation_config = {"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")


def held_out_loss(model: Transformer, rows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(rows[:, :-1])  # (B, S, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).item()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="minillama/demo_model", help="folder to write the model to")
    p.add_argument("--steps", type=int, default=1100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step")
    p.add_argument("--context", type=int, default=512, help="tokens per row (= max_position_embeddings)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--tokenizer-docs", type=int, default=5000, help="documents the tokenizer is trained on")
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Train and save; returns {"losses": [...], "val_loss": float, "seconds": float}."""
    args = parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # -- data: one seeded corpus; the tokenizer sees its first documents; 16 rows held out --
    row_len = args.context + 1  # inputs and next-token targets
    val_rows = 16
    tokens_needed = (args.steps * args.batch_size + val_rows) * row_len
    docs_needed = int(tokens_needed / 120) + 100  # stories average ~150 tokens; 120 leaves slack
    docs = list(documents(docs_needed, seed=args.seed))
    write_tokenizer_files(out, train_tokenizer(docs[: args.tokenizer_docs], args.vocab_size), args.context)
    tokenizer = Tokenizer.from_dir(out)
    rows = pack_rows((encode_document(tokenizer, d) for d in docs), row_len)
    if len(rows) < args.steps * args.batch_size + val_rows:
        raise RuntimeError(f"corpus gave {len(rows)} rows, {args.steps * args.batch_size + val_rows} needed")
    val, train = rows[:val_rows], rows[val_rows:]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    print(f"corpus: {len(docs)} documents, {rows.numel()} tokens in {len(rows)} rows of {row_len} "
          f"({time.time() - t0:.1f}s)", flush=True)

    # -- model: minillama's own Transformer, tied embeddings --
    config = LlamaConfig(
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        vocab_size=tokenizer.vocab_size, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=args.context, tie_word_embeddings=True, torch_dtype="bfloat16",
        bos_token_id=BOS, eos_token_id=[EOS],
    )
    model = Transformer(config)
    init_weights(model, config.num_hidden_layers)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    print(f"model: {n_params} parameters; {args.steps} steps of {args.batch_size} x {args.context} tokens",
          flush=True)

    # -- train --
    model.train()
    losses = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        batch = train[order[step * args.batch_size:(step + 1) * args.batch_size]]  # (B, S + 1)
        logits = model(batch[:, :-1])  # (B, S, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 and step != args.steps - 1:
            print(f"step {step:5d}  held-out loss {held_out_loss(model, val):.4f}", flush=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {group['lr']:.2e}  {time.time() - t0:.0f}s",
                  flush=True)

    val_loss = held_out_loss(model, val)
    save_checkpoint(model, config, out, dtype=torch.bfloat16)
    seconds = time.time() - t0
    print(f"done: train loss {sum(losses[-20:]) / len(losses[-20:]):.4f} (last 20 steps), "
          f"held-out loss {val_loss:.4f}, {seconds:.0f}s; wrote {out}", flush=True)
    return {"losses": losses, "val_loss": val_loss, "seconds": seconds}


if __name__ == "__main__":
    main()

"""Chat with a LLaMA checkpoint in the terminal: ``python -m minillama.chat --model PATH_OR_REPO_ID``.

The conversation keeps its KV cache between turns (each turn prefills only its new tokens), and
the reply streams as it is generated. Time to first token and decode speed go to stderr after each
reply. In the terminal: Ctrl-C stops the current reply (what was said so far stays in the history),
Ctrl-D or /exit quits; /reset, /system TEXT, /save FILE, /load FILE, /help.

When standard input is not a terminal, each line is a user message and standard output receives
only the replies, one per line; notices and statistics go to stderr.

A turn the checkpoint's chat template refuses (or a broken template) is reported and the chat goes
on with its conversation unchanged; /system and /load are checked against the template before they
change anything. Exit statuses and the handling of pipes and bad UTF-8: ``minillama/cli.py``.
"""
import argparse
import signal
import sys
import time

from minillama import cli

COMMANDS = """\
/reset         forget the conversation (the system prompt stays)
/system TEXT   set the system prompt (no TEXT: remove it)
/save FILE     write the conversation to FILE as JSON
/load FILE     continue a conversation saved with /save
/exit          quit (Ctrl-D too); Ctrl-C stops a reply"""


def parse_args(argv=None) -> argparse.Namespace:
    from minillama.hub import DEMO_MODEL_DIR

    p = cli.ArgumentParser(prog="python -m minillama.chat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMMANDS)
    p.add_argument("--model", default=str(DEMO_MODEL_DIR),
                   help="local checkpoint folder or hub repo id (default: the bundled demo model)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest reply, in tokens (default: 512, or half the context if that is less)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 turns it off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 turns it off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 turns it off")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="in [-2, 2], subtracted from the logits of the reply's tokens so far (0: off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="in [-2, 2], times how often each token of the reply came so far (0: off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--max-context", type=int, default=None,
                   help="most tokens the conversation may hold (default: the model's context)")
    p.add_argument("--on-overflow", choices=("drop", "error"), default="drop",
                   help="when a turn does not fit: drop the oldest turns (default) or stop with an error")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                   help="kernels: triton (fused kernels, CUDA graphs), torch (plain PyTorch); auto: triton on CUDA")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel degree: run N processes (one per GPU) through torch's launcher; "
                        "under torchrun, the number of processes")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="default: the checkpoint's on the GPU, float32 on the CPU")
    cli.add_quantize_arguments(p)
    args = p.parse_args(argv)
    cli.check_quantize_arguments(p, args)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.system is not None:
        args.system = cli.text_arg(args.system)  # bytes that are not UTF-8 become U+FFFD
    return args


class Interrupt:
    """While active, Ctrl-C sets ``requested`` instead of raising, so a reply stops between two tokens."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


note = cli.note


def check_template(conv) -> None:
    """Raise ChatTemplateError when the template refuses the conversation followed by a user turn."""
    if conv.chat:
        conv.encode(conv.messages + [{"role": "user", "content": "Hello"}])


def command(conv, line: str) -> bool:
    """Run a /command; False when the chat should end."""
    from minillama.chat_format import ChatTemplateError

    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/exit":
        return False
    if name == "/reset":
        conv.reset()
        note("(conversation cleared)")
    elif name == "/system":
        previous = conv.system
        conv.set_system(arg or None)
        try:
            check_template(conv)
        except ChatTemplateError as e:
            conv.set_system(previous)
            note(f"error: {e}; the system prompt is unchanged")
            return True
        note(f"(system prompt {'set' if arg else 'removed'})")
    elif name in ("/save", "/load"):
        if not arg:
            note(f"error: {name} needs a file name")
        else:
            try:
                if name == "/load":
                    conv.load(arg)
                elif conv.llm.model.tp is None or conv.llm.model.tp.rank == 0:  # one writer under TP
                    conv.save(arg)
                note(f"(saved to {arg})" if name == "/save" else f"(loaded {len(conv.messages)} messages from {arg})")
            except (OSError, ValueError) as e:
                note(f"error: {e}")
    elif name == "/help":
        note(COMMANDS)
    return True


def reply(conv, text: str, args, sampling, interactive: bool) -> None:
    from minillama.chat_format import ChatTemplateError
    from minillama.conversation import ContextOverflowError

    started = not conv.chat  # a continuation keeps its leading space

    def show(delta: str) -> None:
        nonlocal started
        if not started:  # a chat reply's first token often carries the space before its first word
            delta = delta.lstrip()
            started = bool(delta)
        cli.write(delta, flush=True)

    try:
        with Interrupt() as interrupt:
            # under tensor parallelism every rank must stop at the same token: Ctrl-C does not stop a reply
            stats = conv.send(text, args.max_new_tokens, sampling, on_text=show,
                              should_stop=None if conv.llm.model.tp else lambda: interrupt.requested)
    except ContextOverflowError as e:
        if args.on_overflow == "error":  # the chat ends: one line, exit status 2 (minillama/cli.py)
            raise cli.CommandError(str(e)) from None
        note(f"error: {e}")  # too long even without history: the conversation is unchanged
        return
    except ChatTemplateError as e:  # raised before the turn starts: the conversation is unchanged
        note(f"error: {e}")
        return
    cli.write("\n", flush=True)
    if stats.dropped_turns:
        note(f"(context full: dropped the {stats.dropped_turns} oldest turn(s) and re-read the rest)")
    if stats.finish_reason == "interrupted":
        note("(stopped; the partial reply is kept)")
    elif stats.finish_reason == "length" and interactive:
        note(f"(reply cut at --max-new-tokens {args.max_new_tokens})")
    note(f"[{stats.prefill_tokens} prompt tokens ({stats.reused_tokens} cached), "
         f"first token {stats.ttft_s * 1000:.0f} ms, {stats.new_tokens} tokens at {stats.tokens_per_s:.1f} tok/s]")


def main(argv=None) -> int:
    """Exit status: 0, 2 after a one-line error, 130 on Ctrl-C while loading, 141 when stdout's reader left."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.tp is not None and args.tp < 1:
        raise cli.CommandError(f"--tp must be >= 1, got {args.tp}")
    from minillama.parallel import launched_by_torchrun
    from minillama.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                              seed=args.seed)  # checked before --tp starts processes
    if args.tp and args.tp > 1 and not launched_by_torchrun():
        return cli.launch_tensor_parallel(args.tp, args.model, ["-m", "minillama.chat"], cli.without_tp(argv))
    cli.silence_followers()
    from minillama.hub import DEMO_MODEL_DIR, ModelNotFoundError
    if args.model == str(DEMO_MODEL_DIR) and not DEMO_MODEL_DIR.exists():
        raise ModelNotFoundError(f"the bundled demo model is missing ({DEMO_MODEL_DIR}); pass --model PATH_OR_REPO_ID")
    from minillama import Llama  # torch loads here: Ctrl-C from now on exits 130 quietly
    from minillama.chat_format import ChatTemplateError
    from minillama.conversation import Conversation

    start = time.perf_counter()
    llm = Llama.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend, tp=args.tp,
                                progress=cli.load_progress(), quantize=args.quantize,
                                quantize_lm_head=args.quantize_lm_head)
    group = llm.model.tp  # under tensor parallelism rank 0 reads the input and every rank runs it
    conv = Conversation(llm, system=args.system, max_context=args.max_context, on_overflow=args.on_overflow)
    if args.max_new_tokens is None:
        args.max_new_tokens = min(512, conv.max_context // 2)
    if args.max_new_tokens >= conv.max_context:  # no turn could ever fit: say so now, not at every turn
        raise_context = " (or raise --max-context)" if conv.max_context < llm.config.max_position_embeddings else ""
        raise cli.CommandError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in the context "
                               f"of {conv.max_context} tokens; lower it{raise_context}")
    interactive = sys.stdin.isatty() if group is None or group.rank == 0 else False
    note(f"(loaded {args.model} on {llm.device} in {time.perf_counter() - start:.1f} s)")
    if not conv.chat:
        note("(this model has no chat template: plain continuation mode, each message continues the text)")
    try:
        check_template(conv)
    except ChatTemplateError as e:  # each turn will say so too; /system may fix it
        note(f"error: {e}")
    if interactive:
        note("(Ctrl-C stops a reply, Ctrl-D or /exit quits, /help lists commands)")
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

    while True:
        if group is not None and group.rank != 0:
            line = group.broadcast_object()
        else:
            try:
                line = input(">>> ") if interactive else (sys.stdin.readline() or None)  # None: end of input
            except KeyboardInterrupt:
                note("")
                continue
            except EOFError:
                line = None
            if group is not None:
                group.broadcast_object(line)
        if line is None:
            break
        if not interactive:
            line = line.rstrip("\r\n")  # a piped file may end its lines with CRLF
        if not line.strip():
            continue
        if line.split(" ", 1)[0] in ("/exit", "/reset", "/system", "/save", "/load", "/help"):
            if not command(conv, line):
                break
            continue
        reply(conv, line, args, sampling, interactive)
    if interactive:
        note("")
    return 0


if __name__ == "__main__":
    cli.exit_with(main())

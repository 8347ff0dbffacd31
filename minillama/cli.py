"""What the command lines (``scripts/generate.py``, ``python -m minillama.chat``) share: how they
read text, write output and end, as Unix tools do.

Exit statuses of :func:`run`:

    0    done
    2    one line ``error: ...`` on stderr, no traceback: bad arguments or input, a bad
         checkpoint, a model that produced NaN/Inf, output that cannot be written (a full disk,
         a closed standard output)
    130  Ctrl-C, at any time (loading included), quietly
    141  the reader of standard output went away (``| head``): quietly, as ``cat`` ends on SIGPIPE

Text: an argument or a line of piped input that is not valid UTF-8 is decoded with U+FFFD in place
of the bad bytes (:func:`text_arg`, and standard input is reconfigured so); standard output writes
"?" for what its encoding cannot hold. Library code never prints: only the command lines call this.
"""
import argparse
import dataclasses
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_OUTPUT_CLOSED = 141  # 128 + SIGPIPE
ERROR_DIR = "MINILLAMA_TP_ERROR_DIR"  # set by launch_tensor_parallel for the processes it starts
FIXED_LAUNCHER_GRACE = 30  # seconds torch's launcher waits after passing SIGTERM on, where it cannot be set


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are a :class:`CommandError`: under :func:`run`, one line
    ``error: ...`` with exit status 2, as every other error of the command lines (argparse prints
    its whole usage block before the error and exits)."""

    def error(self, message: str):
        raise CommandError(f"{message} (see {self.prog} --help)")


class CommandError(Exception):
    """Bad input that a command line finds itself: one line on stderr, exit status 2."""


class OutputError(Exception):
    """Standard output cannot be written (a full disk, a closed or read-only descriptor)."""


class OutputClosed(Exception):
    """The reader of standard output went away (a closed pipe)."""


def write(text: str, flush: bool = False) -> None:
    """Write ``text`` to standard output (and flush it); failures raise OutputClosed / OutputError."""
    try:
        sys.stdout.write(text)
        if flush:
            sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed() from None
    except OSError as e:
        raise OutputError(f"cannot write to standard output: {e.strerror or e}") from None


def note(text: str) -> None:
    """A line on stderr (notices, statistics, errors); a stderr that cannot be written is ignored."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def text_arg(value: str) -> str:
    """An argument as text: bytes that were not UTF-8 (which Python keeps as lone surrogates) become U+FFFD."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that surrogateescape did not make
        return value.encode("utf-8", "replace").decode("utf-8")


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` as a command line: set up the standard streams, turn every error a user
    can cause into one line on stderr, and return the exit status (see the module docstring)."""
    if sys.stderr is None:  # fd 2 closed: errors go nowhere rather than into a file that took fd 2
        sys.stderr = open(os.devnull, "w")
    if sys.stdout is None:
        note("error: standard output is closed; redirect it (e.g. > out.txt or > /dev/null)")
        return EXIT_ERROR
    for stream, errors in ((sys.stdin, "replace"), (sys.stdout, "replace")):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors=errors)
            except (OSError, ValueError, TypeError):
                pass
    status = EXIT_ERROR
    try:
        status = _run(main, argv)
        return status
    finally:
        _leave_process_group(wait_for_all=status == 0)


def _leave_process_group(wait_for_all: bool) -> None:
    if "torch" in sys.modules:  # a command that never imported torch joined no group
        from minillama.parallel import leave

        leave(wait_for_all)


def _run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]]) -> int:
    try:
        status = main(argv)
        write("", flush=True)
        return status
    except (OutputClosed, BrokenPipeError):  # also a print outside write(), e.g. argparse's --help
        _discard_stdout()
        return EXIT_OUTPUT_CLOSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (CommandError, OutputError, ValueError, OSError, NotImplementedError, MemoryError) as e:
        if isinstance(e, OutputError):
            _discard_stdout()
        _error(f"error: {_one_line(e)}")
        return EXIT_ERROR
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError; anything else is a bug
            raise
        _error(f"error: out of memory: {_one_line(e)}")
        return EXIT_ERROR


def _error(line: str) -> None:
    """The command's one error line: on stderr, or, in a process of :func:`launch_tensor_parallel`,
    into its rank's file there (the launcher prints one rank's line)."""
    folder, rank = os.environ.get(ERROR_DIR), os.environ.get("RANK")
    if folder and rank is not None:
        try:
            (Path(folder) / f"rank{rank}").write_text(line)
            return
        except OSError:
            pass
    note(line)


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's last flush of text that cannot be
    written anywhere prints no "Exception ignored" message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """``--quantize`` and ``--quantize-lm-head``, as every command line that loads a model takes them
    (``Llama.from_pretrained``'s ``quantize`` and ``quantize_lm_head``); check with
    :func:`check_quantize_arguments`."""
    p.add_argument("--quantize", default=None, choices=("int8", "fp8"),
                   help="8-bit projection weights (one scale per output channel), quantized while loading")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="with --quantize: lm_head in 8 bits too (faster batch-1 decode; not for a model whose "
                        "lm_head is its embedding table)")


def check_quantize_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.quantize_lm_head and args.quantize is None:
        p.error("--quantize-lm-head quantizes lm_head along with the projections: add --quantize int8 or fp8")


def load_progress() -> Optional[Callable[[int, int], None]]:
    """A ``progress(bytes_loaded, bytes_total)`` callback drawing one updating line on a terminal's
    stderr (None when stderr is not a terminal: logs and pipes get no progress lines)."""
    if not sys.stderr.isatty():
        return None
    shown = [-1]

    def progress(done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent != shown[0]:
            shown[0] = percent
            end = "\n" if done >= total else ""
            try:
                print(f"\rloading weights: {percent:3d}% of {total / 1e9:.1f} GB", end=end, file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    return progress


def silence_followers() -> None:
    """In every torchrun process but rank 0, point stdout and stderr at /dev/null: the output of a
    tensor-parallel run is what one process prints."""
    from minillama.parallel import is_follower

    if is_follower():
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)


def fixed_launcher_grace() -> Optional[int]:
    """The seconds torch's elastic launcher waits for its processes to end after it passes SIGTERM or
    SIGINT on to them, before it kills them, where that cannot be set: None where its LaunchConfig
    takes a ``shutdown_timeout``, else :data:`FIXED_LAUNCHER_GRACE`."""
    from torch.distributed.launcher.api import LaunchConfig

    if any(f.name == "shutdown_timeout" for f in dataclasses.fields(LaunchConfig)):
        return None
    return FIXED_LAUNCHER_GRACE


def launch_tensor_parallel(tp: int, model, entry: Sequence[str], argv: Sequence[str],
                           shutdown_timeout: Optional[float] = None) -> int:
    """Run this command in ``tp`` processes through torch's elastic launcher (what torchrun runs),
    each joining the group from torchrun's environment; returns the exit status: rank 0's, or, when
    the run failed, that of the lowest rank with an error line, which is printed here (one line).

    The degree is checked against the model's config first (exit 2 naming the numbers, before any
    process starts). ``entry``: what follows ``python`` (``["-m", "minillama.chat"]`` or a script
    path); ``argv``: the arguments, without ``--tp``. ``shutdown_timeout``: the seconds the launcher
    gives the processes to end after it passes SIGTERM or SIGINT on to them, before it kills them
    (only where :func:`fixed_launcher_grace` is None); None: torch's default (30, or
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``).
    """
    import logging
    import uuid

    from minillama.config import LlamaConfig
    from minillama.hub import resolve_checkpoint
    from minillama.parallel import check_degree

    check_degree(LlamaConfig.from_file(resolve_checkpoint(model) / "config.json"), tp)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the launcher's notices are not output, nor its log of a failed rank: the one error line is ours
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=tp, run_id=str(uuid.uuid4().int),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          **({} if shutdown_timeout is None else {"shutdown_timeout": shutdown_timeout}))
    with tempfile.TemporaryDirectory() as errors:
        os.environ[ERROR_DIR] = errors  # the ranks inherit it: each writes its error line there, not to stderr
        try:
            elastic_launch(config, entrypoint=sys.executable)(*entry, *argv)
            return 0
        except ChildFailedError as e:
            return _report_failure(tp, e.failures or {}, Path(errors))
        finally:
            del os.environ[ERROR_DIR]


def _report_failure(tp: int, failures: dict, errors: Path) -> int:
    """One line for a tensor-parallel run that failed, and its exit status. The lowest rank's error
    line, if a rank wrote one: the first rank to fail ends the others (they all check the same
    arguments), so rank 0 may be stopped before it could print. Otherwise name the failed ranks."""
    lines = sorted((int(p.name.removeprefix("rank")), p.read_text()) for p in errors.glob("rank*"))
    if lines:
        rank, line = lines[0]
        note(line)
        code = failures[rank].exitcode if rank in failures else EXIT_ERROR
        return code if code > 0 else EXIT_ERROR
    if 0 in failures and failures[0].exitcode > 0:  # rank 0 printed its own traceback or was interrupted
        return failures[0].exitcode
    ranks = ", ".join(f"{r} ({_exit_description(f.exitcode)})" for r, f in sorted(failures.items()))
    oom = " (SIGKILL: usually the host ran out of memory)" if "SIGKILL" in ranks else ""
    note(f"error: tensor-parallel rank {ranks} of {tp} failed with no error line; only rank 0's output is shown{oom}")
    return EXIT_ERROR


def _exit_description(code: int) -> str:
    """A process's exit code as words: "exit status 3" or, for a negative code, the signal that ended it."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def without_tp(argv: Sequence[str]) -> list:
    """``argv`` with its ``--tp N`` / ``--tp=N`` removed (for the processes the launcher starts)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--tp":
            skip = True
        elif not arg.startswith("--tp="):
            out.append(arg)
    return out


def exit_with(status: int) -> None:
    """End the command with ``status``. Under torchrun, after the output is flushed, the process
    ends at once: the interpreter's teardown of torch.distributed's threads can abort a worker."""
    from minillama.parallel import launched_by_torchrun

    if launched_by_torchrun():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(status)
    sys.exit(status)

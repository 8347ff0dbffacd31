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
import os
import sys
from typing import Callable, Optional, Sequence

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_OUTPUT_CLOSED = 141  # 128 + SIGPIPE


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
        note(f"error: {_one_line(e)}")
        return EXIT_ERROR
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError; anything else is a bug
            raise
        note(f"error: out of memory: {_one_line(e)}")
        return EXIT_ERROR


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

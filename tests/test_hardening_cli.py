"""The command lines as Unix tools, and what a chat must not lose.

scripts/generate.py and ``python -m minillama.chat`` in real subprocesses: a closed output pipe
ends them quietly (status 141, as ``cat``), a full disk or a closed stdout is a one-line error
(status 2), bytes that are not UTF-8 in arguments or piped input are replaced, an unknown device
names the ones that exist, Ctrl-C while loading exits 130 with nothing on stderr, and a model that
produces NaN is an error, not ``⁇ ⁇ ⁇``. The chat reports template errors and keeps its
conversation; /load checks a file against the template; /save is atomic and does not overwrite a
file that is not a saved conversation.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from minillama import Llama
from minillama.chat_format import ChatTemplateError
from minillama.conversation import Conversation
from minillama.hub import DEMO_MODEL_DIR
from tests.checkpoints import checkpoint_factory  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
GENERATE = [sys.executable, str(ROOT / "scripts" / "generate.py")]
CHAT = [sys.executable, "-m", "minillama.chat"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
# A template that refuses two turns of one role in a row (as Mistral's and Gemma's do).
ALTERNATING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def sp_folder(checkpoint_factory):  # noqa: F811
    return checkpoint_factory(tokenizer="sentencepiece", n_layers=1, seed=7)[0]


@pytest.fixture(scope="module")
def chat_folder(checkpoint_factory):  # noqa: F811
    return checkpoint_factory(tokenizer="llama3", n_layers=1, seed=8)[0]


def run(cmd, *args, stdin=b"", **kwargs):
    return subprocess.run([*cmd, *map(str, args)], input=stdin, capture_output="stdout" not in kwargs,
                          env=ENV, cwd=ROOT, timeout=120, **kwargs)


def one_line_error(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.startswith("error: ") and text.count("\n") == 1 and "Traceback" not in text, text
    return text[len("error: "):-1]


def with_template(folder, tmp_path, template):
    copy = tmp_path / "templated"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


# -- output: closed pipe, full disk, closed stdout ----------------------------------------------

@pytest.mark.parametrize("cmd, args", [
    (GENERATE, ["--max-new-tokens", 3, "Lily"]),
    (GENERATE, ["--max-new-tokens", 3, "--stream", "Lily"]),
    (GENERATE, ["--help"]),
    (CHAT, ["--max-new-tokens", 3]),
])
def test_a_closed_output_pipe_ends_quietly(sp_folder, chat_folder, cmd, args):
    """As ``... | head`` after head has exited: the pipe has no reader when the command writes."""
    read, write = os.pipe()
    os.close(read)
    try:
        model = ["--model", chat_folder if cmd is CHAT else sp_folder] if "--help" not in args else []
        proc = run(cmd, *model, *args, stdin=b"Hi Lily\nAnd Tom?\n", stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    # 141 = 128 + SIGPIPE, what a shell reports for cat; --help's text fits the buffer that the exit's
    # flush drops (quietly, with status 0)
    assert proc.returncode in ((141, 0) if "--help" in args else (141,))
    assert b"error" not in proc.stderr and b"Traceback" not in proc.stderr and b"Exception" not in proc.stderr


def test_a_full_disk_is_a_one_line_error(sp_folder):
    with open("/dev/full", "wb") as full:
        proc = run(GENERATE, "--model", sp_folder, "--max-new-tokens", 3, "Lily", stdout=full, stderr=subprocess.PIPE)
    assert proc.returncode == 2
    assert one_line_error(proc.stderr) == "cannot write to standard output: No space left on device"


@pytest.mark.parametrize("cmd", [GENERATE, CHAT])
def test_a_closed_stdout_is_a_one_line_error(sp_folder, cmd):
    args = ["Lily"] if cmd is GENERATE else []
    proc = run(cmd, "--model", sp_folder, *args, stderr=subprocess.PIPE, stdout=None, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 2
    assert one_line_error(proc.stderr) == "standard output is closed; redirect it (e.g. > out.txt or > /dev/null)"


# -- text that is not UTF-8 ---------------------------------------------------------------------

def test_invalid_utf8_arguments_are_replaced(sp_folder):
    raw = os.fsdecode(b"Lily caf\xe9 \xff")  # what Python makes of such argv bytes
    proc = run(GENERATE, "--model", sp_folder, "--max-new-tokens", 4, "--json", raw)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["prompt"] == "Lily caf\ufffd \ufffd"
    expected = Llama.from_pretrained(sp_folder, device="cpu").generate(["Lily caf\ufffd \ufffd"], max_new_tokens=4)
    assert record["token_ids"] == expected[0].token_ids


def test_invalid_utf8_in_piped_chat_input_is_replaced(chat_folder):
    proc = run(CHAT, "--model", chat_folder, "--max-new-tokens", 3, "--device", "cpu",
               stdin=b"Hi caf\xe9\n\xff\xfe\n")
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    conv = Conversation(Llama.from_pretrained(chat_folder, device="cpu"))
    for text in ["Hi caf\ufffd", "\ufffd\ufffd"]:
        conv.send(text, max_new_tokens=3)
    assert proc.stdout.decode() == "".join(m["content"].lstrip() + "\n" for m in conv.messages[1::2])


def test_library_refuses_lone_surrogates_by_name(sp_folder):
    llm = Llama.from_pretrained(sp_folder, device="cpu")
    with pytest.raises(ValueError, match=r"text holds a lone surrogate U\+DCFF at index 5"):
        llm.generate(["Lily \udcff"], max_new_tokens=1)


# -- devices, bad models, Ctrl-C ------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [GENERATE, CHAT])
def test_unknown_device_names_the_devices_here(sp_folder, cmd):
    proc = run(cmd, "--model", sp_folder, "--device", "gpu0", *(["Lily"] if cmd is GENERATE else []))
    assert proc.returncode == 2 and proc.stdout == b""
    assert one_line_error(proc.stderr).startswith("device 'gpu0' is not a device name; this machine has: cpu")


def test_a_model_that_produces_nan_is_an_error_not_garbage(sp_folder, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(sp_folder, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    proc = run(GENERATE, "--model", folder, "--max-new-tokens", 5, "Lily")
    assert proc.returncode == 2 and proc.stdout == b""
    assert one_line_error(proc.stderr).startswith(
        "the model produced NaN/Inf logits (row 0, reading the prompt): these weights hold NaN/Inf values: "
        "model.layers.0.self_attn.v_proj.weight (1 of 512 values)")


def wait_until_reading_a_pipe(proc, deadline):
    """Wait until ``proc`` sleeps in read() on a pipe, not still in the open() our writer woke.

    A SIGINT that lands while open() returns is handled before Python's next check for signals,
    which comes only after read() (the same C call chain) has started blocking: the interrupt
    would be lost. The kernel's wait channel says where the process sleeps; where it names none
    ("0": running just then, or hidden by the kernel), a pause stands in."""
    wchan = f"/proc/{proc.pid}/wchan"
    while True:
        with open(wchan) as f:
            where = f.read()
        if "pipe_read" in where:
            return
        if where in ("", "0"):
            time.sleep(2)
            return
        assert time.monotonic() < deadline and proc.poll() is None, f"the command never read the FIFO (in {where})"
        time.sleep(0.02)


@pytest.mark.parametrize("cmd", [GENERATE, CHAT])
def test_ctrl_c_while_loading_exits_130_quietly(sp_folder, tmp_path, cmd):
    """config.json is a FIFO: the command blocks reading it, provably inside model loading."""
    folder = tmp_path / "fifo"
    shutil.copytree(sp_folder, folder)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    # A Ctrl-C in a terminal reaches a command whose SIGINT is at its default. A suite started as a
    # background job has SIGINT ignored, which a child inherits across exec (and Python then installs
    # no KeyboardInterrupt handler): a handler set here for the launch is reset to the default by exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([*cmd, "--model", str(folder), *(["Lily"] if cmd is GENERATE else [])],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    finally:
        signal.signal(signal.SIGINT, previous)
    fd = None
    try:
        deadline = time.monotonic() + 60
        while fd is None:  # opening the FIFO for writing succeeds once the command has it open for reading
            try:
                fd = os.open(folder / "config.json", os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                assert e.errno == errno.ENXIO and time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
        wait_until_reading_a_pipe(proc, deadline)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if fd is not None:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
    assert (proc.returncode, out, err) == (130, b"", b"")


# -- the chat: template errors, /load, /save ----------------------------------------------------------

def test_chat_reports_a_refused_turn_and_goes_on(chat_folder, tmp_path):
    folder = with_template(chat_folder, tmp_path, ALTERNATING_TEMPLATE)
    saved = tmp_path / "one_user.json"
    saved.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}))
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    out = tmp_path / "out.json"
    stdin = f"Hi Lily\n/load {saved}\nAnd Tom?\n/save {notes}\n/save {out}\n".encode()
    proc = run(CHAT, "--model", folder, "--max-new-tokens", 3, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert (f"error: {saved}: the chat template cannot continue this conversation: the chat template refused the "
            f"messages: roles must alternate\n") in err
    assert f"error: {notes} exists and is not a conversation saved by /save; not overwriting it" in err
    assert notes.read_text() == "precious"
    messages = json.loads(out.read_text())["messages"]
    assert [(m["role"], m["content"] if m["role"] == "user" else "") for m in messages] == [
        ("user", "Hi Lily"), ("assistant", ""), ("user", "And Tom?"), ("assistant", "")]
    assert "Traceback" not in err


def test_chat_with_a_broken_template_reports_each_turn(chat_folder, tmp_path):
    folder = with_template(chat_folder, tmp_path, "{% for m in messages %}{{ m.content }")
    proc = run(CHAT, "--model", folder, "--max-new-tokens", 3, stdin=b"Hi\nHello?\n/system Be kind.\n")
    assert proc.returncode == 0 and proc.stdout == b""
    err = proc.stderr.decode()
    message = "the chat template does not compile (line 1): TemplateSyntaxError: unexpected '}'"
    assert err.count(f"error: {message}\n") == 3 and err.count(f"error: {message}; the system prompt is unchanged") == 1
    assert "Traceback" not in err


def test_send_refused_by_the_template_leaves_the_conversation_intact(chat_folder, tmp_path):
    llm = Llama.from_pretrained(with_template(chat_folder, tmp_path, ALTERNATING_TEMPLATE), device="cpu")
    conv = Conversation(llm)
    conv.send("Hi", max_new_tokens=3)
    messages, cached = [dict(m) for m in conv.messages], list(conv.cached_ids)
    conv.messages.append({"role": "assistant", "content": "again"})  # two assistant turns: the next send fails
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        conv.send("Hello?", max_new_tokens=3)
    conv.messages.pop()
    assert conv.messages == messages and conv.cached_ids == cached
    conv.send("Hello?", max_new_tokens=3)
    assert len(conv.messages) == 4


def test_load_checks_against_the_template_and_changes_nothing_when_refused(chat_folder, tmp_path):
    llm = Llama.from_pretrained(with_template(chat_folder, tmp_path, ALTERNATING_TEMPLATE), device="cpu")
    conv = Conversation(llm)
    conv.send("Hi", max_new_tokens=3)
    before = [dict(m) for m in conv.messages]
    for messages in ([{"role": "user", "content": "a"}],  # a user turn would follow a user turn
                     [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]):
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"messages": messages}))
        with pytest.raises(ChatTemplateError, match="cannot continue this conversation"):
            conv.load(path)
        assert conv.messages == before
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "caf\udcff"}]}))  # JSON may hold one
    with pytest.raises(ValueError, match="lone surrogate"):
        Conversation(Llama.from_pretrained(chat_folder, device="cpu")).load(path)


def test_save_is_atomic_and_refuses_other_files(chat_folder, tmp_path, monkeypatch):
    conv = Conversation(Llama.from_pretrained(chat_folder, device="cpu"), system="Be brief.")
    path = tmp_path / "chat.json"
    conv.save(path)
    first = path.read_text()
    os.chmod(path, 0o640)
    conv.send("Hi", max_new_tokens=3)

    def fail(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", fail)
        with pytest.raises(OSError, match="No space left"):
            conv.save(path)
    assert path.read_text() == first and os.listdir(tmp_path) == ["chat.json"]  # no temporary file left
    conv.save(path)
    assert json.loads(path.read_text())["messages"] == conv.messages
    assert path.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its permissions

    link = tmp_path / "link.json"
    link.symlink_to(path)
    conv.save(link)  # a symlink is followed: the file it points to is replaced, the link stays
    assert link.is_symlink() and json.loads(path.read_text())["messages"] == conv.messages

    for text in ["precious notes", '{"other": 1}', "[1, 2]"]:
        other = tmp_path / "other.txt"
        other.write_text(text)
        with pytest.raises(ValueError, match="exists and is not a conversation saved by /save; not overwriting it"):
            conv.save(other)
        assert other.read_text() == text
    (tmp_path / "empty.json").write_text("")
    conv.save(tmp_path / "empty.json")  # an empty file holds nothing to lose
    with pytest.raises(IsADirectoryError):
        conv.save(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"cannot write {tmp_path / 'nowhere' / 'c.json'}: the folder "):
        conv.save(tmp_path / "nowhere" / "c.json")


# -- scripts/generate.py: every prompt checked before any runs -------------------------------------

def test_a_prompt_that_does_not_fit_in_a_later_batch_fails_before_the_first_runs(tmp_path):
    """The bundled demo model (context 512): batch 1 fits, batch 2 does not."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n" + "hello world " * 300 + "\n")
    proc = run(GENERATE, "--prompt-file", prompts, "--batch-size", 1, "--max-new-tokens", 3)
    assert proc.returncode == 2
    assert proc.stdout == b""  # nothing ran, nothing printed
    assert one_line_error(proc.stderr).startswith("prompt 2: prompt has 1802 tokens, more than the model's context of 512")


# -- scripts/perplexity.py ------------------------------------------------------------------------

PERPLEXITY = [sys.executable, str(ROOT / "scripts" / "perplexity.py")]


@pytest.mark.parametrize("make_text, named", [
    (None, "cannot read --text"),
    (lambda p: p.write_text("\n\n   \n\n"), "holds no text to score"),
    (lambda p: p.write_bytes(b"Lily caf\xe9\n"), "is not UTF-8"),
])
def test_perplexity_bad_text_is_a_one_line_error(sp_folder, tmp_path, make_text, named):
    path = tmp_path / "text.txt"
    if make_text is not None:
        make_text(path)
    proc = run(PERPLEXITY, "--model", sp_folder, "--text", path)
    assert proc.returncode == 2
    assert named in one_line_error(proc.stderr) and str(path) in proc.stderr.decode()


@pytest.mark.parametrize("args, named", [
    (["--model", "/nonexistent/model"], "/nonexistent/model does not exist"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_perplexity_bad_model_or_device_is_a_one_line_error(sp_folder, args, named):
    proc = run(PERPLEXITY, *(["--model", sp_folder] if "--model" not in args else []), *args)
    assert proc.returncode == 2
    assert named in one_line_error(proc.stderr)


# -- --tp: the launcher adds nothing to rank 0's error --------------------------------------------

@pytest.mark.parametrize("args, named", [
    (["--max-new-tokens", -1, "Lily"], "max_new_tokens must be an integer >= 0, got -1"),
    (["--device", "cuda", "Lily"], "CUDA is not available"),
])
def test_an_error_under_tp_is_still_one_line(args, named):
    """The bundled demo model (6 heads, 2 KV heads) in 2 processes on the CPU (gloo)."""
    proc = run(GENERATE, "--tp", 2, *args)
    assert proc.returncode == 2
    assert named in one_line_error(proc.stderr)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_arguments_that_need_no_model_fail_before_tp_starts_processes(command, monkeypatch, capsys):
    """A typo in a sampling flag must not wait for N processes to load a 70B model."""
    from minillama import chat, cli, generate_cli

    started = []
    monkeypatch.setattr(cli, "launch_tensor_parallel", lambda *a: started.append(a) or 0)
    main = generate_cli.main if command == "generate" else chat.main
    extra = ["Lily"] if command == "generate" else []
    assert main(["--tp", "2", "--temperature", "-1", *extra]) == 2
    assert started == []
    assert capsys.readouterr().err == "error: temperature must be >= 0 (0 means greedy), got -1.0\n"
    assert main(["--tp", "2", "--presence-penalty", "2.5", *extra]) == 2 and started == []
    assert capsys.readouterr().err == "error: presence_penalty must be in [-2, 2] (0 turns it off), got 2.5\n"
    if command == "generate":
        assert main(["--tp", "2", "--stop", "", "Lily"]) == 2 and started == []
        assert main(["--tp", "2", "Lily"]) == 0 and len(started) == 1  # good arguments do launch


def test_a_rank_that_fails_alone_under_tp_is_reported(tmp_path, capsys):
    """Only rank 0 prints, so a follower that fails while rank 0 does not must still be named: an
    entry script that exits 3 in rank 1 and 0 in rank 0, launched as --tp 2 launches commands."""
    from minillama.cli import EXIT_ERROR, launch_tensor_parallel

    script = tmp_path / "fails_in_rank_1.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    assert launch_tensor_parallel(2, str(DEMO_MODEL_DIR), [str(script)], []) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: tensor-parallel rank 1 (exit status 3) of 2 failed with no error line; "
                   "only rank 0's output is shown"], err


# Ends on SIGTERM 0.5 s later in rank 0 and 3 s later in rank 1, leaving a file named after its rank in
# the folder of argv[1] when it does; "ready<rank>" there once it waits.
SLOW_TO_END = """import os, signal, sys, time
from pathlib import Path
folder, rank = Path(sys.argv[1]), os.environ["RANK"]
def end(*_):
    time.sleep(0.5 if rank == "0" else 3)
    (folder / ("ended" + rank)).touch()
    sys.exit(0)
signal.signal(signal.SIGTERM, end)
(folder / ("ready" + rank)).touch()
while True:
    time.sleep(0.05)
"""
# Runs that script in 2 processes as --tp runs commands, telling the launcher the grace argv[2].
LAUNCH_SLOW_TO_END = """import sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from minillama.cli import launch_tensor_parallel
from minillama.hub import DEMO_MODEL_DIR
folder, grace = sys.argv[1], float(sys.argv[2])
try:
    launch_tensor_parallel(2, DEMO_MODEL_DIR, [folder + "/slow_to_end.py"], [folder], shutdown_timeout=grace)
except SignalException as e:
    sys.exit(128 + int(e.sigval))
"""


def test_the_launcher_kills_the_processes_after_the_shutdown_timeout_it_is_given(tmp_path):
    """launch_tensor_parallel's shutdown_timeout is the grace torch's launcher gives the processes after
    passing SIGTERM on (30 s when not told): with 1.5 s, the rank that takes 0.5 s to end ends, the one
    that takes 3 s is killed."""
    (tmp_path / "slow_to_end.py").write_text(SLOW_TO_END)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH_SLOW_TO_END, str(tmp_path), "1.5"], env=ENV, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "ended0").exists() and not (tmp_path / "ended1").exists()


def test_serve_under_tp_has_the_launcher_wait_out_its_shutdown_timeout(monkeypatch, capsys):
    """The server of --tp needs --shutdown-timeout after SIGTERM, then SHUTDOWN_GRACE to close: the
    launcher is told to wait that long. A torch whose launcher cannot be told (it waits 30 s) refuses
    a --shutdown-timeout that does not fit, before any process starts."""
    import math

    from minillama import cli, serve

    graces = []
    monkeypatch.setattr(cli, "launch_tensor_parallel", lambda *_, shutdown_timeout: graces.append(shutdown_timeout) or 0)
    for value in ("60", "0", "inf"):
        assert serve.main(["--tp", "2", "--shutdown-timeout", value]) == 0
    assert graces == [60 + serve.SHUTDOWN_GRACE, serve.SHUTDOWN_GRACE, math.inf]
    graces.clear()
    monkeypatch.setattr(cli, "fixed_launcher_grace", lambda: 30)
    assert serve.main(["--tp", "2", "--shutdown-timeout", "60"]) == 2 and graces == []
    assert capsys.readouterr().err == (
        "error: --shutdown-timeout 60 does not fit under --tp: this torch's launcher kills the processes 30 s after "
        "passing SIGTERM on and the server needs 5 s more to close; give --shutdown-timeout 25 or less, or upgrade "
        "torch to a release whose launcher takes a shutdown_timeout\n")
    assert serve.main(["--tp", "2"]) == 0 and graces == [None]  # the default, 25 s, fits in the launcher's 30 s


# -- chat: a reply length that cannot fit, a turn that does not fit under --on-overflow error -------

@pytest.mark.parametrize("args", [["--max-new-tokens", 512], ["--max-context", 64, "--max-new-tokens", 64]])
def test_chat_refuses_a_max_new_tokens_that_leaves_no_room_for_a_message(args):
    """The bundled demo model (context 512): no turn could ever fit, so the chat does not start."""
    proc = run(CHAT, *args, stdin=b"Tell me a story about a cat.\n")
    assert proc.returncode == 2 and proc.stdout == b""
    last = proc.stderr.decode().splitlines()[-1]
    assert last.startswith("error: --max-new-tokens") and "leaves no room" in last, proc.stderr


def test_chat_on_overflow_error_exits_2_with_one_error_line():
    proc = run(CHAT, "--max-context", 40, "--max-new-tokens", 10, "--on-overflow", "error",
               stdin=b"Tell me a story about a cat.\nAnd one about a dog.\n")
    assert proc.returncode == 2  # the documented status of an error (was 1)
    lines = proc.stderr.decode().splitlines()
    assert lines[-1].startswith("error: the conversation needs") and "Traceback" not in proc.stderr.decode()
    assert len(proc.stdout.decode().splitlines()) == 1  # the first reply


# -- serve: bad flags are one error line, before the model loads ---------------------------------

SERVE = [sys.executable, "-m", "minillama.serve", "--device", "cpu"]


@pytest.mark.parametrize("args, named", [
    (["--port", -1], "--port must be in [0, 65535], got -1"),
    (["--port", 70000], "--port must be in [0, 65535], got 70000"),
    (["--max-queue", -1], "--max-queue must be >= 0, got -1"),
    (["--request-timeout", 0], "--request-timeout must be > 0 seconds, got 0.0"),
    (["--request-timeout", "nan"], "--request-timeout must be > 0 seconds, got nan"),
    (["--shutdown-timeout", -1], "--shutdown-timeout must be >= 0 seconds, got -1.0"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout must be >= 0 seconds, got nan"),
    (["--served-model-name", ""], "--served-model-name must not be empty, got ''"),
    (["--log-level", "bogus"], "argument --log-level: invalid choice: 'bogus'"),
    (["--max-seq-len", 100000], "--max-seq-len 100000 is more than the model's context of 512"),
    (["--max-seq-len", 100000, "--tp", 2], "--max-seq-len 100000 is more than the model's context of 512"),
    (["--max-seq-len", 0], "--max-seq-len must be >= 2 (a prompt token and an output token), got 0"),
])
def test_serve_refuses_bad_flags_before_loading(args, named):
    """Each exits 2 with the value named, before the model loads (a typo must not wait for a 70B
    load), and without starting a server (timeout: a flag that is wrongly accepted would serve)."""
    proc = subprocess.run([*SERVE, *map(str, args)], capture_output=True, env=ENV, cwd=ROOT, timeout=30)
    assert proc.returncode == 2 and proc.stdout == b"", proc.stderr
    assert named in one_line_error(proc.stderr) and b"loaded" not in proc.stderr  # argparse's own errors too


def test_serve_fails_at_once_on_a_port_in_use_or_a_host_that_does_not_resolve():
    """The socket is bound before the model loads: one error line naming the address, status 2."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, named in ((["--port", port], f"cannot listen on 127.0.0.1:{port}: Address already in use"),
                            (["--host", "no.such.host.invalid"], "--host 'no.such.host.invalid' does not resolve")):
            proc = subprocess.run([*SERVE, *map(str, args)], capture_output=True, env=ENV, cwd=ROOT, timeout=30)
            assert proc.returncode == 2 and proc.stdout == b"" and b"loaded" not in proc.stderr, proc.stderr
            assert one_line_error(proc.stderr).startswith(named)


def test_serve_checks_max_seq_len_against_the_config_before_loading_the_weights(tmp_path):
    """Weights that cannot load stand for a 70B load: the context check must come first."""
    folder = tmp_path / "no_weights"
    shutil.copytree(DEMO_MODEL_DIR, folder)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    proc = subprocess.run([*SERVE, "--model", str(folder), "--max-seq-len", "100000"], capture_output=True, env=ENV,
                          cwd=ROOT, timeout=30)
    assert proc.returncode == 2
    assert one_line_error(proc.stderr) == "--max-seq-len 100000 is more than the model's context of 512"

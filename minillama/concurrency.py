"""One model, or one conversation, used from several threads.

A generation step is a forward of the model followed by the sampling that reads its logits. On a
GPU the forward may replay a CUDA graph whose input and output buffers are shared by every
generation on the model, so two steps must not overlap: :func:`step_lock` gives each model one
lock, which the generate loop holds for each step. Generations in several threads then interleave
step by step, each on its own cache, and every row gets the tokens it would get alone.

A :class:`~minillama.conversation.Conversation` is one sequence of turns: a second call while
one is running (from another thread, or from a callback of the running turn) has no well-defined
place in it, so it is refused with :class:`ConcurrentUseError` and changes nothing.
"""
import functools
import threading
import weakref

_STEP_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


class ConcurrentUseError(RuntimeError):
    """An object that serves one caller at a time was called while busy."""


def step_lock(model) -> threading.Lock:
    """The lock that serializes generation steps on ``model`` (one per model object)."""
    with _GUARD:
        lock = _STEP_LOCKS.get(model)
        if lock is None:
            lock = _STEP_LOCKS[model] = threading.Lock()
        return lock


def exclusive(method):
    """Make ``method`` refuse to run (ConcurrentUseError) while another exclusive method of the
    same object is running, in any thread."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _GUARD:
            busy = self.__dict__.get("_busy_lock")
            if busy is None:
                busy = self.__dict__["_busy_lock"] = threading.Lock()
        if not busy.acquire(blocking=False):
            raise ConcurrentUseError(
                f"this {type(self).__name__} is busy with another call (a turn running in another thread, or "
                f"a callback of the running turn); calls to one {type(self).__name__} must not overlap: wait "
                f"for the running call, or use one {type(self).__name__} per thread"
            )
        try:
            return method(self, *args, **kwargs)
        finally:
            busy.release()

    return wrapper

"""The signals that stop a script, as exceptions: Ctrl-C (SIGINT) raises Python's
KeyboardInterrupt, and SIGTERM (a scheduler's stop), where `scripts/` ask for it
(`launch.run`), raises `Terminated`, a KeyboardInterrupt too, so that every clean-up written for
a Ctrl-C (a partial file or export removed, a checkpoint save completed) runs for both. The
scripts' handler (`raise_interrupt`) raises after a compile, an import or a garbage-collection
callback, not inside it; the library's notebook entry points use it too (`handled_interrupts`).
"""

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by `raise_interrupt` where a Ctrl-C's KeyboardInterrupt would be."""


# Per signal deferred (`_defer`): its token while its repeat is scheduled, True once sent. The
# timer's send, the handler and `raise_pending` change it under `_lock` (re-entrant: the handler
# runs on the main thread, possibly inside `raise_pending`).
_deferred: dict[int, object] = {}
_lock = threading.RLock()
_RETRY_S = 0.1
_raised: list[int] = []  # the signals `raise_interrupt` raised, in order


def in_compile(frame: Any) -> bool:
    """Whether `frame` (the one a signal handler interrupted) is JAX's call of XLA's compiler,
    which runs Python's signal handlers from C++ while it compiles."""
    compiler = sys.modules.get("jax._src.compiler")
    return (
        frame is not None
        and compiler is not None
        and frame.f_code.co_filename == getattr(compiler, "__file__", None)
    )


def _in_import(frame: Any) -> bool:
    """Whether `frame` or a frame below it imports a module (also where a module being imported
    calls the library: a Ctrl-C there comes once that import is done)."""
    while frame is not None:
        if frame.f_code.co_filename == "<frozen importlib._bootstrap>":
            return True
        frame = frame.f_back
    return False


def _defer(signum: int) -> None:
    """Sends `signum` to the main thread again `_RETRY_S` later, unless `raise_pending` raises
    it meanwhile."""
    token = object()
    with _lock:
        _deferred[signum] = token

    def send_again() -> None:
        with _lock:
            if _deferred.get(signum) is token:  # not raised by `raise_pending` meanwhile
                _deferred[signum] = True
                signal.pthread_kill(threading.main_thread().ident, signum)

    again = threading.Timer(_RETRY_S, send_again)
    again.daemon = True
    again.start()


def raise_interrupt(signum: int, frame: Any) -> None:
    """A SIGINT or SIGTERM handler (`launch.run` sets it): raises `exception_of(signum)`, unless
    it runs in a compile (`in_compile`) or an import. XLA's compiler runs Python's signal
    handlers from C++: an exception raised there was dropped (a Ctrl-C during a compile was
    lost: the evaluation went on and wrote its results) or abandoned the compile, whose threads
    then crashed Python's exit (a segmentation fault after `interrupted`); one raised in an
    import leaves the module half made (`jax` without `jax._src` until the process restarts).
    There the signal is sent to the main thread again `_RETRY_S` later, until it lands
    elsewhere; `raise_pending` raises one still waiting when the script (or
    `handled_interrupts` block) ends. The same signal sent again meanwhile (a second Ctrl-C)
    raises at once, wherever it lands."""
    with _lock:  # None: a new signal; True: this handler's repeat; a token: one waits
        state = _deferred.pop(signum, None)
    if state is not None and state is not True:  # a second one while the first waits: now
        raise exception_of(signum)
    if in_compile(frame) or _in_import(frame):
        _defer(signum)
        return
    _raised.append(signum)
    raise exception_of(signum)


def redeliver_dropped_interrupts(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A `sys.unraisablehook` that hands a KeyboardInterrupt which Python drops (one raised in
    a finalizer or a garbage-collection callback, e.g. TF's `__del__`, JAX's buffer collection:
    "Exception ignored in ...", after which the script ran to its end and exited 0) back to the
    main thread, raised there again (`_defer`: raised now, it would strike in this hook and be
    dropped again); other unraisable errors go to `previous`. Setting its `active` to False
    makes it pass everything to `previous` (a hook installed over it since stays in place)."""

    def hook(unraisable: Any) -> None:
        if hook.active and issubclass(unraisable.exc_type, KeyboardInterrupt):
            _defer(signal_of(unraisable.exc_type))
        else:
            previous(unraisable)

    hook.active, hook.previous = True, previous
    return hook


@contextlib.contextmanager
def handled_interrupts() -> Iterator[None]:
    """A library entry point's block (`load_checkpoint`, a `Predictor`'s calls, an export), as
    a notebook runs it: with Python's default SIGINT handler on the main thread (a notebook's
    kernel, a user's script), Ctrl-C during the block is handled as in the scripts
    (`raise_interrupt`, `redeliver_dropped_interrupts`), then the default is back and a Ctrl-C
    deferred till the block's end is raised. A Ctrl-C during a compile then stops the call
    after it (the interrupt was lost, or the compile went on in the background, gigabytes and
    both cores per interrupted call, and crashed the exit), one in a garbage-collection
    callback is not lost, one during the first call's imports does not leave JAX half
    imported, and a checkpoint read it cuts raises it, not a "corrupt checkpoint". Nothing
    changes off the main thread or under another handler (the scripts' own). The unraisable
    hook is given back too, or, where another was installed over it during the block (the
    filter of `storage_errors.drop_reports_of_failures`, once per process), passes all on."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    hook = sys.unraisablehook
    signal.signal(signal.SIGINT, raise_interrupt)
    redeliver = sys.unraisablehook = redeliver_dropped_interrupts(hook)
    try:
        yield
    except BaseException:
        with _lock:
            _deferred.pop(signal.SIGINT, None)  # the block ended anyway
        raise
    finally:
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        finally:
            redeliver.active = False
            if sys.unraisablehook is redeliver:
                sys.unraisablehook = hook
    raise_pending()


def raise_pending() -> None:
    """Raises the interrupt deferred (`_defer`) whose repeat has not been sent yet, if any (that
    repeat is then not sent). One already sent is left to its delivery, which raises it: a
    KeyboardInterrupt each, not two, and none left over for a later call."""
    with _lock:
        waiting = [signum for signum, state in _deferred.items() if state is not True]
        _deferred.clear()
    if waiting:
        _raised.append(waiting[0])
        raise exception_of(waiting[0])


def raised_count() -> int:
    """How many interrupts `raise_interrupt` has raised so far (for `raised_since`)."""
    return len(_raised)


def raised_since(count: int) -> int | None:
    """The last signal whose interrupt `raise_interrupt` raised after the first `count`, or
    None: whether an error was an interrupt that a library turned into another error (orbax's
    "Encountered error while reading array index" for a read cut by Ctrl-C)."""
    return _raised[-1] if len(_raised) > count else None


def raising_handlers() -> dict[int, Callable]:
    """The signals whose handler now raises (SIGINT: `raise_interrupt` or Python's default;
    SIGTERM: where set to `raise_interrupt`), each with its handler; {} off the main thread (no
    handler runs there)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    raising = {
        signal.SIGINT: (raise_interrupt, signal.default_int_handler),
        signal.SIGTERM: (raise_interrupt,),
    }
    return {
        signum: signal.getsignal(signum)
        for signum, handlers in raising.items()
        if signal.getsignal(signum) in handlers
    }


def exception_of(signum: int) -> KeyboardInterrupt:
    """What the raising handler of `signum` raises."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def signal_of(interrupt: type[KeyboardInterrupt]) -> int:
    """The signal whose raising handler raises `interrupt` (a KeyboardInterrupt type)."""
    return signal.SIGTERM if issubclass(interrupt, Terminated) else signal.SIGINT

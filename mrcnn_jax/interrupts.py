"""The signals that stop a script, as exceptions: Ctrl-C (SIGINT) raises Python's
KeyboardInterrupt, and SIGTERM (a scheduler's stop), where `scripts/` ask for it
(`launch.run`), raises `Terminated`, a KeyboardInterrupt too, so that every clean-up written for
a Ctrl-C (a partial file or export removed, a checkpoint save completed) runs for both. The
scripts' handler (`raise_interrupt`) raises after a compile, not inside it.
"""

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by `raise_interrupt` where a Ctrl-C's KeyboardInterrupt would be."""


# Per signal deferred by `raise_interrupt`: False while its repeat is scheduled, True once sent.
_deferred: dict[int, bool] = {}
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


def raise_interrupt(signum: int, frame: Any) -> None:
    """A SIGINT or SIGTERM handler (`launch.run` sets it): raises `exception_of(signum)`, unless
    it runs in a compile (`in_compile`). XLA's compiler runs Python's signal handlers from C++:
    an exception raised there was dropped (a Ctrl-C during a compile was lost: the evaluation
    went on and wrote its results) or abandoned the compile, whose threads then crashed
    Python's exit (a segmentation fault after `interrupted`). There the signal is sent to the
    main thread again `_RETRY_S` later, until it lands after the compile; `raise_pending`
    raises one still waiting when the script ends. The same signal sent again meanwhile (a
    second Ctrl-C) raises at once, wherever it lands."""
    repeat = _deferred.pop(signum, None)  # None: a new signal; True: this handler's repeat
    if repeat is False:  # a second one while the first waits: stop now
        raise exception_of(signum)
    if in_compile(frame):
        _deferred[signum] = False

        def send_again() -> None:
            if signum in _deferred:  # not raised by `raise_pending` meanwhile
                _deferred[signum] = True
                signal.pthread_kill(threading.main_thread().ident, signum)

        again = threading.Timer(_RETRY_S, send_again)
        again.daemon = True
        again.start()
        return
    _raised.append(signum)
    raise exception_of(signum)


def raise_pending() -> None:
    """Raises the interrupt `raise_interrupt` deferred and has not raised yet, if any."""
    if _deferred:
        signum = next(iter(_deferred))
        _deferred.clear()
        _raised.append(signum)
        raise exception_of(signum)


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

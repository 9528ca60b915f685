"""The signals that stop a script, as exceptions: Ctrl-C (SIGINT) raises Python's
KeyboardInterrupt, and SIGTERM (a scheduler's stop), where `scripts/` ask for it
(`launch.run`), raises `Terminated`, a KeyboardInterrupt too, so that every clean-up written for
a Ctrl-C (a partial file or export removed, a checkpoint save completed) runs for both. The
scripts' handler (`raise_interrupt`) raises outside JAX's code only.
"""

import os
import signal
import threading
from collections.abc import Callable
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by `raise_interrupt` where a Ctrl-C's KeyboardInterrupt would be."""


# Where JAX's code is: its compiler runs signal handlers from C++ while it compiles.
_JAX_CODE = (f"{os.sep}jax{os.sep}", f"{os.sep}jaxlib{os.sep}")
_RETRY_S = 0.1
# Per signal deferred by `raise_interrupt`: False while its repeat is scheduled, True once sent.
_deferred: dict[int, bool] = {}


def raise_interrupt(signum: int, frame: Any) -> None:
    """A SIGINT or SIGTERM handler (`launch.run` sets it): raises `exception_of(signum)`, unless
    it runs inside JAX's code. XLA's compiler runs Python's signal handlers from C++ as it
    compiles: an exception raised there was dropped (a Ctrl-C during a compile was lost: the
    evaluation went on and wrote its results) or abandoned the compile, whose threads then
    crashed Python's exit (a segmentation fault after `interrupted`). There the signal is sent
    to the main thread again `_RETRY_S` later, until it lands outside JAX (after the compile).
    The same signal sent again meanwhile (a second Ctrl-C) raises at once, wherever it lands."""
    repeat = _deferred.pop(signum, None)  # None: a new signal; True: this handler's repeat
    if repeat is False:  # a second one while the first waits: stop now
        raise exception_of(signum)
    if frame is not None and any(part in frame.f_code.co_filename for part in _JAX_CODE):
        _deferred[signum] = False

        def send_again() -> None:
            _deferred[signum] = True
            signal.pthread_kill(threading.main_thread().ident, signum)

        again = threading.Timer(_RETRY_S, send_again)
        again.daemon = True
        again.start()
        return
    raise exception_of(signum)


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

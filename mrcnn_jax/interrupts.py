"""The signals that stop a script, as exceptions: Ctrl-C (SIGINT) raises Python's
KeyboardInterrupt, and SIGTERM (a scheduler's stop), where `scripts/` ask for it
(`launch.run`), raises `Terminated`, a KeyboardInterrupt too, so that every clean-up written for
a Ctrl-C (a partial file or export removed, a checkpoint save completed) runs for both.
"""

import signal
import threading
from collections.abc import Callable
from typing import Any, NoReturn


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by `raise_terminated` where a Ctrl-C's KeyboardInterrupt would be."""


def raise_terminated(signum: int, frame: Any) -> NoReturn:
    """A SIGTERM handler: raises `Terminated`."""
    raise Terminated


def raising_handlers() -> dict[int, Callable]:
    """The signals whose handler now raises (SIGINT: Python's default; SIGTERM: where set to
    `raise_terminated`), each with its handler; {} off the main thread (no handler runs there)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    raising = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: raise_terminated}
    return {s: handler for s, handler in raising.items() if signal.getsignal(s) is handler}


def exception_of(signum: int) -> KeyboardInterrupt:
    """What the raising handler of `signum` raises."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def signal_of(interrupt: type[KeyboardInterrupt]) -> int:
    """The signal whose raising handler raises `interrupt` (a KeyboardInterrupt type)."""
    return signal.SIGTERM if issubclass(interrupt, Terminated) else signal.SIGINT

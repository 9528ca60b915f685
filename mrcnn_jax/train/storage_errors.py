"""What orbax and TensorStore report when reading or writing a checkpoint fails, made short.

A failed read (a damaged copy) or write (a full disk) of a checkpoint's arrays surfaces from
TensorStore as a ValueError whose first line says what happened and which file, followed by the
store's spec (~2 KB), wrapped by orbax. Orbax's other reads and writes of the same checkpoint
fail too, and report it later, from TensorStore's threads, from asyncio tasks and coroutines
when they are collected (or at exit), and in orbax's own error logs: hundreds of lines, each
with the spec. `storage_failure` extracts the one line worth showing; `drop_reports_of_failures`
silences the rest, leaving the caller to raise one clear error.
"""

import logging
import re
import sys

# TensorStore's errors (ValueErrors) start with an absl status code, e.g. "OUT_OF_RANGE: Error
# reading ...", or "Error opening ..."; most end with the store's spec (~2 KB).
_TENSORSTORE_ERROR = re.compile(
    r"^(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
    r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
    r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): |"
    r"\[tensorstore_spec=|in OCDBT database at "
)
# Orbax's wrapper of a failed array read (a bare `Exception`, TensorStore's error as its cause).
_ORBAX_READ_ERROR = "Encountered error while reading array index"
_MAX_LENGTH = 500


def _chain(error: BaseException | None):
    """`error` and the errors it was raised from (its cause or context), outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def storage_failure(error: BaseException | None, os_errors: bool = False) -> str | None:
    """What TensorStore said when reading or writing a checkpoint's arrays failed in `error`
    (or in one of the errors it was raised from): its first line without the store's spec, at
    most 500 characters (its start and end). With `os_errors`, failing that, the message of the
    first `OSError` in the chain (a file orbax wrote itself). None when `error` is no such
    failure (e.g. a tree that does not match the target)."""
    found = None
    for link in _chain(error):
        message = str(link)
        if _TENSORSTORE_ERROR.search(message):
            found = message  # the innermost one names the file (and the byte range)
        elif found is None and message.startswith(_ORBAX_READ_ERROR):
            found = _ORBAX_READ_ERROR.lower()
    if found is None and os_errors:
        found = next((str(link) for link in _chain(error) if isinstance(link, OSError)), None)
    if found is None:
        return None
    found = found.split("\n", 1)[0].split(" [tensorstore_spec=", 1)[0]
    if len(found) <= _MAX_LENGTH:
        return found
    half = (_MAX_LENGTH - 5) // 2  # the start says what failed, the end why (the OS's reason)
    return f"{found[:half]} ... {found[-half:]}"


class _FailureRecords(logging.Filter):
    """Drops log records that carry a storage failure: asyncio's "Task exception was never
    retrieved" and orbax's "Save Finalize thread failed" and the like, each with TensorStore's
    error and its ~2 KB spec."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and storage_failure(record.exc_info[1]) is not None)


# The loggers whose records of a failure are dropped: asyncio's, and absl's (orbax logs there).
_LOGGERS = ("asyncio", "absl")


def drop_reports_of_failures() -> None:
    """Installs, once per process, the filters that drop what orbax's other reads or writes of a
    failed restore or save report besides the error raised (dozens of tracebacks, from
    TensorStore's threads, when their asyncio tasks and coroutines are collected, or at exit):
    a `sys.unraisablehook` that passes every other unraisable exception to the previous hook
    (found also below hooks of this project installed over it since, each naming its
    `previous`: `interrupts.handled_interrupts` installs one per call), and `_FailureRecords`
    on asyncio's and absl's loggers. They drop TensorStore's errors and
    orbax's wrappers of them (`storage_failure`) and, with no object, the `RuntimeError: Event
    loop is closed` of each read or write still in flight when orbax closed its event loop."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _FailureRecords) for f in logger.filters):
            logger.addFilter(_FailureRecords())
    previous = layer = sys.unraisablehook
    while layer is not None:
        if getattr(layer, "drops_storage_failures", False):
            return
        layer = getattr(layer, "previous", None)

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        closed_loop = (
            unraisable.object is None
            and type(error) is RuntimeError
            and str(error) == "Event loop is closed"
        )
        if not (closed_loop or storage_failure(error) is not None):
            previous(unraisable)

    hook.drops_storage_failures, hook.previous = True, previous
    sys.unraisablehook = hook


def tensorflow_error_text(error: BaseException) -> str:
    """The first line of a TensorFlow op's error (`tf.errors.OpError.message`), without the
    `{{function_node __wrapped__WriteSummary_device_/job:localhost/...}}` prefix of an op run
    eagerly; `str(error)` for other errors."""
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"^\{\{[^}]*\}\}\s*", "", message.strip())
    return (message.splitlines() or [""])[0]

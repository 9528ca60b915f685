"""Process set-up shared by the scripts: JAX's distributed runtime flags, huge pages, the
compilation cache, and errors in one line (`run`, `errors_in_one_line`).

`define_flags()` registers `--multihost`, `--coordinator_address`, `--num_processes` and
`--process_id`; `initialize()` (after absl parsed them, before any other JAX call) passes them to
`mrcnn_jax.sharding.initialize_distributed`, turning its ValueErrors into usage errors.
`set_up_process()` (first thing in scripts/train.py, eval.py, predict.py, export.py and
benchmark.py, before JAX is imported) calls the three set-ups below: `use_huge_pages()` restarts
the script with glibc's malloc on transparent huge pages, `use_compilation_cache()` (all but
benchmark.py) keeps compiled programs on disk between runs and `use_fast_cpu_codegen()` (also
tests/conftest.py) has XLA:CPU compile without LLVM's loop unrolling: a faster compile at the
same step time.
"""

import contextlib
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from mrcnn_jax import interrupts

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
XLA_FLAGS = "XLA_FLAGS"
BACKEND_EXTRA_OPTIONS = "--xla_backend_extra_options"
CPU_CODEGEN_OPTIONS = "xla_cpu_disable_loop_unrolling"
COMPILATION_CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"
COMPILATION_CACHE_MAX_SIZE = "JAX_COMPILATION_CACHE_MAX_SIZE"
DEFAULT_COMPILATION_CACHE_BYTES = 4 * 2**30
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

_FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags() -> None:
    """Registers the distributed-runtime flags (once per process)."""
    _FLAGS["multihost"] = flags.DEFINE_bool(
        "multihost",
        None,
        "Call jax.distributed.initialize() (default: when a cluster environment is detected).",
    )
    _FLAGS["coordinator_address"] = flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0's coordinator (with --num_processes and --process_id); the "
        "port must be free on process 0's host, one per run: a process of another run given "
        "the address of a run in progress ends that run (JAX aborts all its processes).",
    )
    _FLAGS["num_processes"] = flags.DEFINE_integer(
        "num_processes", None, "Number of processes (with --coordinator_address and --process_id)."
    )
    _FLAGS["process_id"] = flags.DEFINE_integer(
        "process_id", None, "This process's index, 0..num_processes-1 (with the other two)."
    )


_CONFIG_FLAGS: set[str] = set()  # the names of `define_config_flag`'s flags


def define_config_flag(name: str, help_text: str) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_file(name, None, help_text)`. ml_collections reads the
    command line's `--flagfile`s as it defines the flag; one that cannot be opened ends the
    script as absl's parsing ends it (its one line, exit status 1), not a traceback. A leading
    `~` of its file is expanded (`parse_flags`), as in every other path."""
    _CONFIG_FLAGS.add(name)
    try:
        return config_flags.DEFINE_config_file(name, None, help_text)
    except flags.CantOpenFlagFileError as error:
        _flags_error(str(error))


def _expand_config_paths(args: list[str]) -> list[str]:
    """`args` (the flags, a `--flagfile`'s read in) with the `~` of each `--config=~/...` (a
    config flag's file) expanded: a shell leaves it as it is after `=`, a flagfile always.
    Arguments after a bare `--` are not flags."""
    expanded = []
    for i, arg in enumerate(args):
        if arg == "--":
            return expanded + args[i:]
        name, _, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in _CONFIG_FLAGS and value.startswith("~"):
            arg = f"--{name}={os.path.expanduser(value)}"
        expanded.append(arg)
    return expanded


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=launch.parse_flags)`), where a config
    override is a usage error naming the flag, as other bad flags are, when it names no field
    (`--config.train.num_stpes=5`: ml_collections' KeyError traceback), when no `--config` is
    given (absl called it an unknown flag) and when the `--config` file cannot be opened (a
    chained OSError traceback), and a `--config` file without `get_config()` (a traceback)."""
    try:  # --flagfile=FILE's flags as the arguments they stand for
        given = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    except flags.Error:  # absl's parsing below says what is wrong
        given = argv[1:]
    named = [a.lstrip("-").split("=", 1)[0] for a in given if a.startswith("-")]
    overrides = [f"--{name}" for name in named if name.startswith("config.")]
    if overrides and "config" in flags.FLAGS and "config" not in named:
        _flags_error(
            f"{overrides[0]} overrides a field of --config, which is not given: pass the config "
            "file first (--config=configs/<name>.py)"
        )
    argv = [argv[0], *_expand_config_paths(given)]
    try:
        return app.parse_flags_with_usage(argv)
    except OSError as error:  # the --config file could not be opened (read for an override)
        if not overrides:
            raise
        _flags_error(_unreadable_config("config", _value_in(given, "config"), error))
    except (AttributeError, KeyError) as error:
        if _has_no_get_config(error):
            _flags_error(
                f"--config={_value_in(given, 'config')}: the file defines no get_config() (a "
                "config file: configs/<name>.py)"
            )
        if not overrides:
            raise
        _no_such_field(error, overrides)


def _has_no_get_config(error: Exception) -> bool:
    """Whether `error` is ml_collections' own lookup of `get_config` in the --config file
    failing (not an error of the file's own code, e.g. its call of another module's
    `get_config`, whose traceback points at the line)."""
    if not isinstance(error, AttributeError) or getattr(error, "name", None) != "get_config":
        return False
    innermost = error.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    module = innermost.tb_frame.f_globals.get("__name__", "") if innermost else ""
    return module.startswith("ml_collections.")


def _no_such_field(error: Exception, overrides: list[str]) -> NoReturn:
    """Ends the process on ml_collections' KeyError or AttributeError for an override that
    names no config field, naming the flag (and ml_collections' suggestion)."""
    name = re.search(r"[A-Za-z_]\w*", str(error))
    name = name.group() if name else "?"
    flag = next((a for a in overrides if name in a.lstrip("-").split(".")), "--config.*")
    suggestion = re.search(r'Did you mean "(\w+)"', str(error))
    _flags_error(
        f"flag {flag}: the config has no field {name!r}"
        + (f' (did you mean "{suggestion.group(1)}"?)' if suggestion else "")
    )


def _flags_error(message: str) -> NoReturn:
    """Ends the process as absl ends it on a bad flag: its message and a pointer to the help."""
    print(f"FATAL Flags parsing error: {message}", file=sys.stderr)
    print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(1)


def _value_in(argv: list[str], name: str) -> str:
    """The last value of flag `name` in `argv` (`--name=value` or `--name value`)."""
    values = [
        a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
        for i, a in enumerate(argv)
        if a.lstrip("-").split("=", 1)[0] == name and a.startswith("-")
    ]
    return values[-1] if values else ""


def _unreadable_config(name: str, path: str, error: OSError) -> str:
    """What went wrong opening `path`, the file of the config flag `name`: the flag, the file,
    why (the OS's words), and the folder a relative path was taken from."""
    if not path:
        return f"--{name} is empty: give a config file (configs/<name>.py)"
    reason = re.findall(r"\[Errno \d+\] ([^:\n]+)", str(error.__cause__ or error))
    where = "" if os.path.isabs(path) else f" (looked for from {os.getcwd()})"
    return f"--{name}={path}: {reason[-1] if reason else error}{where}"


def config_of(flag: flags.FlagHolder) -> Any:
    """The value of a `config_flags.DEFINE_config_file` flag (a ConfigDict, or None unset).

    ml_collections keeps a config file it could not open (no such file, no permission) as an
    object that raises at first use, a chained OSError traceback; here it is a usage error
    naming the flag, the file, why, and the folder a relative path was taken from. A config
    file whose own code fails (a syntax error, an exception in `get_config`) keeps its
    traceback: it points at the line.
    """
    config = flag.value
    if config is None:
        return None
    try:
        config.get("model")  # the first use of a config that failed to load raises
    except OSError as error:
        path = flags.FLAGS[flag.name].config_filename
        raise app.UsageError(_unreadable_config(flag.name, path, error)) from error
    argv = flags.FLAGS.read_flags_from_files(sys.argv[1:], force_gnu=False)  # --flagfile's too
    _check_repeated_tuples(flag.name, config, argv)
    return config


def _check_repeated_tuples(name: str, config: Any, argv: list[str]) -> None:
    """Refuses a tuple field given twice on the command line (`--config.data.image_size=(256,
    256) ... --config.data.image_size=(320, 320)`): ml_collections joins the two tuples, where
    a scalar given twice takes the last value as absl does."""
    given = [a.lstrip("-").split("=", 1) for a in argv if a.lstrip("-").startswith(f"{name}.")]
    fields: dict[str, list[str]] = {}
    for field, *value in given:
        fields.setdefault(field, []).append(value[0] if value else "")
    for field, values in fields.items():
        if len(values) < 2:
            continue
        node = config
        for key in field.split(".")[1:]:
            node = node[key]
        if isinstance(node, tuple | list):
            raise app.UsageError(
                f"--{field} is given {len(values)} times ({', '.join(values)}); ml_collections "
                f"would join the tuples into {tuple(node)}: give it once"
            )


def mark_paths_required(names: Sequence[str]) -> None:
    """absl's `flags.mark_flags_as_required(names)`, and an empty value is a usage error too:
    `--workdir=$RUN` with `RUN` unset meant the current folder (a training wrote its checkpoints
    and config.json there)."""
    flags.mark_flags_as_required(names)
    for name in names:
        flags.register_validator(
            name,
            lambda value: value != "",
            message=f"--{name} is empty (an unset shell variable?): name a folder",
        )


def path_flag(value: str, flag: str) -> str:
    """`paths.absolute(value)`, checked before any work: a URL of a scheme etils.epath cannot
    open, or whose storage does not answer (no network, no credentials), is a usage error
    naming `flag` and the storage's reason (it came after the work, or as "not a workdir").

    Raises:
      app.UsageError: as above.
    """
    from mrcnn_jax import paths

    try:
        path = paths.absolute(value)
    except ValueError as error:
        raise app.UsageError(f"{flag}: {error}") from error
    if reason := paths.unreachable(path):
        raise app.UsageError(f"cannot reach {path} ({flag}): {reason}")
    return path


def make_output_folder(folder: str | os.PathLike, flag: str) -> None:
    """Creates `folder` (and its parents; a local path or a `gs://` one, through `epath`) and
    writes and deletes an empty file there, so that outputs that cannot be written are a usage
    error naming `flag` before the work, not an error after it.

    Raises:
      app.UsageError: the folder cannot be made (a regular file in its path, no permission)
        or written to (read-only).
    """
    from etils import epath

    path = epath.Path(folder)
    probe = path / f".write_check_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError as error:  # mkdir: a file, or a link to nothing, has the name
        name = error.filename or os.fspath(folder)
        what = "a symbolic link to nothing" if os.path.islink(name) else "a file, not a folder"
        raise app.UsageError(f"cannot write into {folder} ({flag}): {name} is {what}") from error
    except Exception as error:  # OSError locally; the storage backend's own errors elsewhere
        raise app.UsageError(f"cannot write into {folder} ({flag}): {error}") from error


@contextlib.contextmanager
def new_output_folder(folder: str | os.PathLike, flag: str) -> Iterator[None]:
    """`make_output_folder(folder, flag)` for a block that writes there: if the block fails (an
    error, an exit, Ctrl-C), the folders it made (`folder` and missing parents) are removed
    again where still empty, so a failed run leaves the path as it found it."""
    from etils import epath

    made, node = [], epath.Path(folder)
    while not node.exists() and node != node.parent:
        made.append(node)
        node = node.parent
    make_output_folder(folder, flag)
    try:
        yield
    except BaseException:
        for path in made:  # the deepest first
            try:
                if not path.is_dir() or any(path.iterdir()):
                    break
                path.rmdir()
            except OSError:
                break
        raise


def run(main: Callable[[list[str]], Any], sigterm: bool = True, **kwargs: Any) -> None:
    """`absl.app.run(main, **kwargs)` for the scripts, where a usage error (`app.UsageError`: a
    bad flag value, input file or folder) ends the script with `error: <message>` and one line
    naming `--help` (exit status 1), instead of absl's usage message: the script's whole
    docstring and flag list (40-90 lines) above the one line that matters. A Ctrl-C in `main`
    that the script does not handle itself ends it with one line, not a traceback, killed by
    SIGINT as Python ends then (a shell's loop stops too; exit status 130), also when it struck
    in a finalizer, where Python drops it, or during a compile, where JAX's compiler dropped it
    (`interrupts.raise_interrupt`). With `sigterm` (not train.py, whose trainer handles
    it: a checkpoint first), SIGTERM is raised as `interrupts.Terminated`, a KeyboardInterrupt:
    the same clean-ups, then `terminated (SIGTERM)` and exit status 143.

    With several processes (`initialize()`), a process that ends so (a usage error, an error
    message, an interrupt, a traceback) without the others ends at once instead of waiting for
    them in JAX's exit, and they end at their next collective with it, naming it
    (`processes.end_unless_all_stop`)."""

    def main_with_short_usage_errors(argv: list[str]) -> Any:
        from mrcnn_jax import jax_settings  # imports JAX: after absl parsed the flags
        from mrcnn_jax.programs import processes

        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not SIG_IGN (`&`)
            signal.signal(signal.SIGINT, interrupts.raise_interrupt)  # not inside a compile
        if sigterm and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, interrupts.raise_interrupt)
        sys.unraisablehook = interrupts.redeliver_dropped_interrupts(sys.unraisablehook)
        try:
            with jax_settings.defaults():  # also with JAX_ENABLE_X64=1 etc. in the environment
                result = main(argv)
            interrupts.raise_pending()  # a Ctrl-C during a last compile
            processes.finish(0)
            return result
        except app.UsageError as error:
            print(
                f"error: {error}\n(`{sys.argv[0]} --help` describes the script and its flags)",
                file=sys.stderr,
                flush=True,
            )
            processes.end_unless_all_stop(f"error: {error}", 1)
            sys.exit(1)
        except SystemExit as stop:
            if isinstance(stop.code, str):  # an error message: `sys.exit("error: ...")`
                print(stop.code, file=sys.stderr, flush=True)
                processes.end_unless_all_stop(stop.code, 1)
                sys.exit(1)
            processes.finish(stop.code or 0)  # e.g. train.py stopped with the others: 143
            raise
        except interrupts.Terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # another one now: no traceback
            print("terminated (SIGTERM)", file=sys.stderr, flush=True)
            processes.end_unless_all_stop("SIGTERM", 128 + signal.SIGTERM)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
            processes.end_unless_all_stop("Ctrl-C", -signal.SIGINT)
            sys.excepthook = lambda *exc_info: None  # no traceback; Python then kills itself
            raise  # with SIGINT, so that a shell running it in a loop stops (exit(130) did not)
        except Exception as error:  # a traceback: with several processes, not waiting for all
            if processes.is_distributed():
                traceback.print_exc()
                processes.end_unless_all_stop(f"{type(error).__name__}: {error}", 1)
                sys.excepthook = lambda *exc_info: None  # printed already
            raise
        finally:  # a SIGTERM after `main` (at exit): killed as by default, not a traceback
            if sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    app.run(main_with_short_usage_errors, **kwargs)


@contextlib.contextmanager
def errors_in_one_line(*types: type[BaseException]) -> Iterator[None]:
    """Ends the script with `error: <message>` (exit status 1) on an error of `types` raised in
    the block: errors whose message names the bad input (a config field, a data or weights
    file, a checkpoint), which a traceback would bury. The traceback is logged at INFO level
    (`--verbosity=0` shows it)."""
    try:
        yield
    except types as error:
        logging.info("The traceback of the error below:", exc_info=True)
        sys.exit(f"error: {error}")


def initialize() -> None:
    """Starts the distributed runtime as the flags say (imports JAX: call it after parsing).
    JAX's runtime takes SIGTERM for its preemption service, which only a trainer asks; where
    `run` raised SIGTERM as `interrupts.Terminated` (not train.py), it does again after."""
    from mrcnn_jax import sharding

    handler = signal.getsignal(signal.SIGTERM)
    try:
        sharding.initialize_distributed(**{name: holder.value for name, holder in _FLAGS.items()})
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    if handler is interrupts.raise_interrupt:
        signal.signal(signal.SIGTERM, handler)  # JAX's C++ handler replaced it unseen


_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def set_up_process(compilation_cache: bool = True) -> None:
    """What a script does before importing JAX: `use_huge_pages()` (may restart the process),
    then `use_compilation_cache()` unless `compilation_cache` is False (benchmark.py times cold
    compiles), then `use_fast_cpu_codegen()`. Nothing for a help request (`--help`, `-h`,
    `--helpfull`, ...): it makes no cache folder and has no program to speed up."""
    if any(arg.split("=")[0] in _HELP_FLAGS for arg in sys.argv[1:]):
        return
    use_huge_pages()
    if compilation_cache:
        use_compilation_cache()
    use_fast_cpu_codegen()


def use_huge_pages() -> None:
    """Re-executes this script (same interpreter, same command line) with
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, so that malloc backs large blocks with transparent
    huge pages (2 MiB instead of 4 KiB).

    XLA:CPU allocates a train step's buffers afresh at every call, and the kernel faults each 4 KiB
    page in: 0.16 M page faults and 0.56 s of system time per shapes_r18 step, 0.92 M and 5.4 s per
    R50 step at 512² on the project's CPU; with huge pages 1 k and 0.18 s, 3 k and 3.1 s (steps
    1.62 -> 1.41 s and 20.4 -> 18.8 s, docs/performance.md). glibc reads the tunable only when a
    process starts, hence the re-execution, done before JAX or TF is imported. Nothing happens
    when `GLIBC_TUNABLES` already names `glibc.malloc.hugetlb` (set it to
    `glibc.malloc.hugetlb=0` to opt out), off Linux/glibc, or when the kernel's transparent huge
    pages are off. In a notebook, start Jupyter with the variable set instead.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if HUGE_PAGES_TUNABLE in tunables or not _huge_pages_available():
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{HUGE_PAGES_TUNABLE}=1"]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _huge_pages_available() -> bool:
    """Linux with glibc, and transparent huge pages in "always" or "madvise" mode."""
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open(_THP_SETTING) as setting:
            return "[never]" not in setting.read()
    except OSError:
        return False


def use_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache in `default_compilation_cache_dir()`, at
    most `DEFAULT_COMPILATION_CACHE_BYTES` (least recently used programs evicted), unless the
    environment already sets `JAX_COMPILATION_CACHE_DIR` (a folder of one's own, or empty to turn
    the cache off). Where the folder cannot be made (a read-only home), it says so on stderr and
    leaves the cache off, and so where one of its folders (`mrcnn_jax/xla/<machine>`, made
    readable and writable by you only) belongs to another user or others may write to it: the
    cache holds code that runs. Call it before JAX is imported: JAX reads the variables at
    import.

    A later run of the same program (resuming training, eval.py after training, predict.py
    again) then loads it instead of compiling it: the R50-FPN train step at 512² compiles in
    about 25 s on a 2-core CPU and loads in a few (docs/performance.md). JAX only stores programs
    that took at least `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` (1 s) to compile, and only
    process 0 of a multi-host job writes (on CPU the others then always compile: JAX's key
    holds each process's own devices' topology). The cache is trusted code: keep it in a
    folder that only you can write to (the default is in your home directory).
    """
    if COMPILATION_CACHE_DIR in os.environ:
        return
    path = default_compilation_cache_dir()
    try:
        problem = _make_private_folders(path, levels=3)  # mrcnn_jax/xla/<machine>
    except OSError as error:  # a read-only home: run without the cache, once warned
        problem = str(error)
    if problem:
        print(f"compilation cache off ({problem}); set {COMPILATION_CACHE_DIR}", file=sys.stderr)
        return
    os.environ[COMPILATION_CACHE_DIR] = path
    os.environ.setdefault(COMPILATION_CACHE_MAX_SIZE, str(DEFAULT_COMPILATION_CACHE_BYTES))


def use_fast_cpu_codegen() -> None:
    """Adds `--xla_backend_extra_options=xla_cpu_disable_loop_unrolling` to `XLA_FLAGS`: XLA:CPU
    then compiles its kernels without LLVM's loop unrolling. On the project's 2-core CPU
    (docs/performance.md) the R50-FPN train step at 512² compiles in 16.1 s instead of 18.6 s
    (means of 4 and 5 processes), the shapes_r18 step in 16.8 s instead of 20.1 s and R50
    inference in 4.5 s instead of 5.2 s, at the same step time; inference outputs are
    bit-identical, train losses agree to float32 rounding. Other backends ignore the option (XLA
    hands LLVM only the extra options whose names do not start with `xla_`).

    Nothing changes when `XLA_FLAGS` already sets `--xla_backend_extra_options` (the user's
    options win). To opt out, name an option no one reads there:
    `XLA_FLAGS=--xla_backend_extra_options=xla_keep_defaults` (not an empty value: XLA would
    hand LLVM an empty argument and stop). XLA reads `XLA_FLAGS` when JAX starts its backends,
    so call it before that (the scripts call it before importing JAX); in a notebook, set the
    variable before starting Jupyter.
    """
    flags = os.environ.get(XLA_FLAGS, "")
    if BACKEND_EXTRA_OPTIONS in flags:
        return
    os.environ[XLA_FLAGS] = " ".join(
        filter(None, [flags, f"{BACKEND_EXTRA_OPTIONS}={CPU_CODEGEN_OPTIONS}"])
    )


def _make_private_folders(path: str, levels: int) -> str:
    """Makes the last `levels` folders of `path` where missing, readable and writable by this
    user only (0700), and returns why they cannot hold trusted code ("" if they can): one of
    them is owned by another user (a link to someone else's folder, too) or writable by others.
    """
    folders = [path]
    for _ in range(levels - 1):
        folders.insert(0, os.path.dirname(folders[0]))
    os.makedirs(os.path.dirname(folders[0]), exist_ok=True)
    for folder in folders:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        status = os.stat(folder)  # through a link: its target's
        if status.st_uid != os.getuid():
            return f"{folder} belongs to user id {status.st_uid}, not to you"
        if status.st_mode & 0o022:
            return f"{folder} is writable by other users (mode {oct(status.st_mode & 0o777)})"
    return ""


def default_compilation_cache_dir() -> str:
    """`$XDG_CACHE_HOME/mrcnn_jax/xla/<machine>` (`~/.cache` without XDG_CACHE_HOME), where
    `<machine>` is the CPU architecture and a hash of its feature flags: XLA:CPU compiles for
    the host's instruction set, so machines sharing a home directory keep their programs apart.
    """
    import hashlib
    import platform

    features = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            features = next((x for x in cpuinfo if x.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    digest = hashlib.sha256(features.encode()).hexdigest()[:8]
    machine = f"{platform.machine() or 'unknown'}-{digest}"
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "mrcnn_jax", "xla", machine)

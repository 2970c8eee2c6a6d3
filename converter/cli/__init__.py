"""The ``qconv`` command line: parse, call one library function, render. Nothing else.

Exit codes, decided here only: 0 success, 1 a verification gate failed, 2 bad usage or bad
input (one line on stderr naming the file or tensor, no traceback), 130 stopped by Ctrl-C (SIGINT)
and 143 by SIGTERM (one line saying what was cleaned up and what was kept). ``--json`` prints one JSON
document on stdout; progress bars go to stderr, and only on a terminal.

Each command lives in a module of this package by area (``convert``: convert and verify;
``evaluate``: eval; ``registry``: ls, show, rm; ``hub``: push and release; ``ui``: ui) and calls :class:`qconv.Qconv`;
``render`` draws what they show. The commands are added to the group here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

# The libraries qconv drives talk on their own (transformers' "Loading weights" bars, bitsandbytes'
# note about an optional CPU kernel package); the CLI shows qconv's progress and errors instead.
# QCONV_DEBUG=1 leaves them alone.
if not os.environ.get("QCONV_DEBUG"):
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # huggingface_hub's "Retrying in 1s [Retry 1/5]" lines: qconv says a failure once, as one line
    # (the environment for a client imported later, the logger for one imported already)
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import warnings  # noqa: E402

from qconv import __version__  # noqa: E402
from qconv.cli import convert, evaluate, hub, registry, ui  # noqa: E402  (after the environment above)
from qconv.cli.render import fail  # noqa: E402
from qconv.errors import QconvError, QconvWarning, Terminated, VerificationFailed  # noqa: E402


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """qconv's own warnings as one line on stderr (``warning: ...``), not Python's two lines
    with a file and a source line; other libraries' warnings stay hidden unless QCONV_DEBUG."""
    if issubclass(category, QconvWarning):
        text = message.cli_message() if isinstance(message, QconvWarning) else message
        click.echo(f"warning: {text}", err=True)
    elif os.environ.get("QCONV_DEBUG"):
        click.echo(warnings.formatwarning(message, category, filename, lineno, line), err=True, nl=False)


# click 8.2 and later answer a bare `qconv` with this error carrying the help; 8.1 prints the help
# itself and exits (the tuple is then empty: nothing to catch)
_NO_ARGS_IS_HELP = tuple(e for e in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if e)


class Stopped(Exception):
    """A command stopped by a signal, after the library's cleanup ran; carried past click's own
    Ctrl-C handling (a blank line and "Aborted!", exit 1) to :meth:`QconvGroup.main`."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


@contextmanager
def _signals_raise():
    """While a command runs: SIGINT raises KeyboardInterrupt (as Python's own handler does) and
    SIGTERM raises :class:`Terminated`, a KeyboardInterrupt, so that the cleanup the library does
    for Ctrl-C (``except BaseException`` / ``finally``: temp folders removed, a calibration
    checkpoint left in place) runs for both. The command's parameters at that moment are kept on
    the exception for the message. After the first signal both are ignored: a second Ctrl-C would
    cut the cleanup short and leave the temporary folder behind (SIGKILL still ends a hung one)."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal would refuse
        yield
        return

    def stop(signum, _frame):
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        exc = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
        ctx = click.get_current_context(silent=True)
        exc.qconv_command = (ctx.info_name, dict(ctx.params)) if ctx is not None else (None, {})
        exc.qconv_signal = signum
        raise exc

    # a signal ignored when qconv started stays ignored: a shell without job control starts a
    # background command (`qconv convert ... &` in a script) with SIGINT ignored, so that the
    # terminal's Ctrl-C does not reach it
    previous = {
        s: signal.getsignal(s)
        for s in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(s) is not signal.SIG_IGN
    }
    for s in previous:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _stopped_message(exc: KeyboardInterrupt) -> tuple[int, str]:
    """The signal and one line: what stopped, what was cleaned up, what was kept on purpose."""
    signum = getattr(exc, "qconv_signal", signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    what = "Terminated (SIGTERM)" if signum == signal.SIGTERM else "Interrupted (SIGINT)"
    command, params = getattr(exc, "qconv_command", (None, {}))
    unrecorded = getattr(exc, "qconv_unrecorded", None)
    if unrecorded is not None:
        # stopped once the artifact was in place, before it was recorded (qconv.pipeline's
        # stopped_leaves_unrecorded): nothing temporary is left, and the artifact is whole
        text = (
            f"{what}: {command or 'qconv'} stopped after writing {unrecorded}: the artifact there is complete"
        )
        if params.get("record", True):
            text += f" but not recorded in the registry (`qconv verify {unrecorded} --record` records it)"
        return signum, text
    text = f"{what}: {command or 'qconv'} stopped; its temporary files were removed"
    output = params.get("output") if command == "convert" else None
    if output is not None:
        dest = Path(output).expanduser()
        checkpoint = dest.parent / f".{dest.name}.qconv-checkpoint"
        if checkpoint.is_dir():
            text += f"; the calibration checkpoint {checkpoint} is kept: add --resume to continue"
    return signum, text


def _leave_soon(code: int, after_s: float = 5.0) -> None:
    """Python's exit joins every non-daemon thread, and one can hold a stopped process forever: a
    pool worker started just as the signal came (never registered, so never told to stop: a
    stdlib race, tests/test_signals.py hit it) or a hash of a large source file still running. The
    cleanup has run by now, so whatever is still running after a few seconds is left behind."""

    def leave() -> None:
        time.sleep(after_s)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    threading.Thread(target=leave, name="qconv-exit", daemon=True).start()


class QconvGroup(click.Group):
    """Turns qconv's errors (and OS errors such as a full disk) into one line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click answers a usage mistake (an unknown option, a missing argument, a value not among
        the choices) with the usage, a hint and the error on four lines; qconv's rule is one line
        naming the mistake (and the JSON document under --json), exit 2."""
        # signals are the CLI's to handle only here (a program calling main() keeps its own)
        self.standalone = standalone_mode
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            # not standalone: click returns ctx.exit's code (commands themselves return None)
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # a bare `qconv`: the help, as before
            exc.show()
            sys.exit(exc.exit_code)
        except Stopped as exc:
            code = 128 + exc.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
            if "--json" in argv:
                click.echo(json.dumps({"error": str(exc), "exit_code": code}))
            click.echo(str(exc), err=True)
            if args is None:  # a process of its own (the `qconv` command), not a caller's main(args)
                _leave_soon(code)
            sys.exit(code)
        except click.UsageError as exc:
            message = exc.format_message().strip().splitlines()[0]
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            if "--json" in argv:
                click.echo(json.dumps({"error": message, "exit_code": exc.exit_code}))
            click.echo(f"Error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        # qconv's warnings as one line each, as they happen, whatever filters the process has
        # (restored after the command: a program calling main() keeps its own)
        if not getattr(self, "standalone", False):
            with warnings.catch_warnings():
                warnings.simplefilter("always", QconvWarning)
                warnings.showwarning = _show_warning
                return self._invoke(ctx)
        with warnings.catch_warnings(), _signals_raise():
            warnings.simplefilter("always", QconvWarning)
            warnings.showwarning = _show_warning
            try:
                return self._invoke(ctx)
            except KeyboardInterrupt as exc:  # the cleanup has run as the exception came up
                raise Stopped(*_stopped_message(exc)) from None

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VerificationFailed as exc:
            ctx.exit(exc.exit_code)  # the command has rendered the failed report already
        except QconvError as exc:
            fail(ctx, exc.cli_message(), exc.exit_code)
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            fail(ctx, f"{where}{exc.strerror or exc}", 2)


@click.group(cls=QconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qconv")
def main() -> None:
    """qconv: convert -> verify -> record -> release quantized language models."""


# The commands live by area; importing registers them on `main`.


for command in (
    convert.convert,
    convert.verify,
    evaluate.evaluate,
    registry.list_artifacts,
    registry.show,
    registry.remove,
    hub.push,
    hub.release,
    ui.serve_ui,
):
    main.add_command(command)

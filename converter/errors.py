"""Every error qconv raises on purpose.

Library code raises these; only the CLI turns them into a one-line message and an exit code.
Each subclass also subclasses the matching built-in, so callers that catch ``ValueError`` or
``FileNotFoundError`` keep working (the pattern huggingface_hub uses).
"""

from __future__ import annotations

from typing import Any

_UNSET: Any = object()


def literal(text: Any) -> str:
    """``text`` (a path, another error's message) as it is inside a :class:`UsageError`
    template, whose braces are fields."""
    return str(text).replace("{", "{{").replace("}", "}}")


class QconvError(Exception):
    """Root of qconv's errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 2
    #: where the error happened, outermost first (a tensor's name...), set by :meth:`with_context`
    context: tuple[str, ...] = ()

    def with_context(self, prefix: str) -> QconvError:
        """Prefix the message with where it happened (``tensor: message``) and return the same
        exception object: its type, fields and traceback are kept, unlike rebuilding it with
        ``type(exc)(message)``, which breaks subclasses whose constructor takes other arguments."""
        self.context = (prefix, *self.context)
        return self

    def message(self, flags: bool = False) -> str:
        """The message without its context. ``flags``: name options as command-line flags
        (``--bits 3``) rather than as Python arguments (``bits 3``); only :class:`UsageError`
        names options."""
        return super().__str__()

    def cli_message(self) -> str:
        """The one line the CLI prints (after ``Error:``)."""
        return "".join(f"{prefix}: " for prefix in self.context) + self.message(flags=True)

    def __str__(self) -> str:
        return "".join(f"{prefix}: " for prefix in self.context) + self.message()


class UsageError(QconvError, ValueError):
    """A bad option or combination of options (unknown method, unsupported bits...).

    Library users call options by their Python names, CLI users by their flags, so a message
    about an option is a template with fields rather than a finished string:

    - ``{option}``: ``option`` (a name such as ``"quant_type"``, or a tuple of names), rendered
      ``quant_type`` by ``str()`` and ``--quant-type`` by :meth:`cli_message`; ``{options}``:
      the same as a list in words (``a, b and c``);
    - ``{value}`` / ``{value!r}``: ``value``, the same in both;
    - ``{method}``: ``method``, rendered ``method bnb`` and ``--method bnb``;
    - ``{condition}``: ``condition``, another option and its value under which this one is
      refused (``("bits", 4)``), rendered ``bits 4`` and ``--bits 4``.

    ``UsageError("{option} {value!r} is not a device", option="device", value="tpu")`` reads
    ``device 'tpu' is not a device`` from Python and ``--device 'tpu' is not a device`` in the
    CLI. Without fields the message is used as given.
    """

    def __init__(
        self,
        message: str,
        *,
        option: str | tuple[str, ...] | None = None,
        value: Any = _UNSET,
        method: str | None = None,
        condition: tuple[str, Any] | None = None,
    ):
        self.template = message
        self.option = option
        self.value = None if value is _UNSET else value
        self.method = method
        self.condition = condition
        self._has_fields = any(x is not None for x in (option, method, condition)) or value is not _UNSET
        super().__init__(self.message())

    def message(self, flags: bool = False) -> str:
        if not self._has_fields:
            return self.template

        def name(option: str) -> str:
            return "--" + option.replace("_", "-") if flags else option

        names = (self.option,) if isinstance(self.option, str) else tuple(self.option or ())
        method = None if self.method is None else f"{name('method')} {self.method}"
        condition = None if self.condition is None else f"{name(self.condition[0])} {self.condition[1]}"
        shown = [name(n) for n in names]
        return self.template.format(
            option=", ".join(shown),
            options=" and ".join(filter(None, [", ".join(shown[:-1]), *shown[-1:]])),
            value=self.value,
            method=method,
            condition=condition,
        )


class SourceError(QconvError, ValueError):
    """A source that cannot be read: missing, truncated, corrupt, unsupported architecture."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The source path or id does not exist."""


class ArtifactError(QconvError, ValueError):
    """An artifact folder that is malformed or does not match its manifest."""


class DestinationExistsError(QconvError, FileExistsError):
    """The output folder exists and --force was not given."""


class DiskSpaceError(QconvError, OSError):
    """The destination's file system cannot hold the artifact (found before any quantization)."""


class VerificationFailed(QconvError):
    """A verification gate failed; the report is attached. The CLI renders the report itself,
    so it exits 1 without printing this message."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class RegistryError(QconvError, RuntimeError):
    """The registry database cannot be opened or an id is unknown or ambiguous."""


class MissingDependencyError(QconvError, ImportError):
    """An optional library a method needs is not installed."""


class HubError(QconvError, RuntimeError):
    """The Hub refused or failed a request (bad token, no such repo, still failing after retries).
    Its message never holds the token."""


class NotVerifiedError(QconvError, ValueError):
    """An artifact whose verification failed or never ran, asked to be published without --force."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI's handler as Ctrl-C raises KeyboardInterrupt, so that the same
    cleanup runs (a temporary folder removed, a calibration checkpoint kept). Not an ``Exception``:
    ``except Exception`` blocks let it through, as they let Ctrl-C through."""


class QconvWarning(UserWarning):
    """What the library warns about without refusing (re-quantizing an already quantized
    source...); the CLI prints each as one ``warning:`` line on stderr (:meth:`cli_message`:
    naming options as flags, like :class:`UsageError`, when the warning was made with
    :meth:`about_option`)."""

    def __init__(self, message: str, cli_message: str | None = None):
        super().__init__(message)
        self._cli_message = cli_message

    @classmethod
    def about_option(cls, template: str, option: str) -> QconvWarning:
        """``template`` with ``{option}`` naming ``option`` (``base_model``; ``--base-model`` in
        the CLI)."""
        text = UsageError(template, option=option)
        return cls(text.message(), text.message(flags=True))

    def cli_message(self) -> str:
        return self._cli_message or str(self)

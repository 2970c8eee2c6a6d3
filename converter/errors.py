"""Every error qconv raises on purpose.

Library code raises these; only the CLI turns them into a one-line message and an exit code.
Each subclass also subclasses the matching built-in, so callers that catch ``ValueError`` or
``FileNotFoundError`` keep working (the pattern huggingface_hub uses).
"""

from __future__ import annotations


class QconvError(Exception):
    """Root of qconv's errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class UsageError(QconvError, ValueError):
    """A bad option or combination of options (unknown method, unsupported bits...)."""


class SourceError(QconvError, ValueError):
    """A source that cannot be read: missing, truncated, corrupt, unsupported architecture."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The source path or id does not exist."""


class ArtifactError(QconvError, ValueError):
    """An artifact folder that is malformed or does not match its manifest."""


class DestinationExistsError(QconvError, FileExistsError):
    """The output folder exists and --force was not given."""


class VerificationFailed(QconvError):
    """A verification gate failed; the report is attached."""

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

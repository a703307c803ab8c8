"""Errors a user can cause. Each names the field, the bad value and what would be accepted."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PlaitError(Exception):
    """Base of every error that a user's input can cause (config, CLI, plan, RPC input).

    The CLI prints these as one line and exits with code 2, without a traceback.
    """

    exit_code = 2


class ConfigError(PlaitError):
    """A configuration key is unknown, has the wrong type, or is inconsistent with another."""

    def __init__(self, key: str, value: object, accepted: str, hint: str | None = None):
        self.key = key
        self.value = value
        self.accepted = accepted
        self.hint = hint
        message = f"config key '{key}': got {value!r}; {accepted}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class CLIError(PlaitError):
    """A command-line argument is missing or malformed."""


class LaunchError(PlaitError):
    """Workers could not be started or one of them failed; the message says which and where its log is."""

    exit_code = 1


class JobCannotContinue(PlaitError):
    """A failure no restart can fix: its newest snapshot is lost and nothing older can stand in, or a fault could
    not be carried out. The workers stop the job instead of letting the elastic agent restart them in vain; the
    message says why and what would have prevented it."""

    exit_code = 1


class CheckpointError(PlaitError):
    """A disk checkpoint given to resume or export from cannot be used; the message names the flag and the fix."""


class NoCheckpoint(CheckpointError):
    """Nothing at the given place is a complete disk checkpoint of a run."""


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint's step directory lacks some rank's files: it was being written when the run stopped."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint holds a model of another shape than the configured one (the message names the parameter)."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint file does not match the checksum its rank recorded when it wrote it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """Return "did you mean 'x'?" for the closest of ``choices``, or None if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None

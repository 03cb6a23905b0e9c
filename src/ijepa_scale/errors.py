"""Errors that launchers print as one line, without a traceback."""


class UserError(ValueError):
    """A bad config value, input path, device list or resume request; the message says the fix (exit 2)."""


class RunFailure(RuntimeError):
    """A failure after start-up whose cause is known (a full disk, a diverged loss); the message
    names the cause and what to do (exit 1)."""

    on_every_rank = False
    """True when every rank raises it at the same point, so one rank's message speaks for all."""

"""Errors that launchers print as one line, without a traceback."""


class UserError(ValueError):
    """A bad config value, input path, device list or resume request; the message says the fix (exit 2)."""


class ConfigError(UserError):
    """A user mistake in a config file or a command-line override."""


class RunFailure(RuntimeError):
    """A failure after start-up whose cause is known (a full disk, a diverged loss); the message
    names the cause and what to do (exit 1)."""

    on_every_rank = False
    """True when every rank raises it at the same point, so one rank's message speaks for all."""


def one_line(exc: BaseException) -> str:
    """The message of a UserError/RunFailure on one line, also when a DataLoader worker raised it
    (torch then wraps it in the worker's traceback; the cause is its last line)."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name = f"{type(exc).__name__}: "
        text = last[last.index(name) + len(name):] if name in last else last
    return " ".join(text.split())

"""Errors that are the user's to fix: launchers print them as one line, without a traceback."""


class UserError(ValueError):
    """A bad config value, input path, device list or resume request; the message says the fix."""

"""The one exception type users see: the CLIs print it as a single line and exit non-zero."""


class DDPMError(Exception):
    """A user-facing error; its message says what is wrong and what to do about it."""

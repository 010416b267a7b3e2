"""One exception type for user-facing problems: the CLI prints its message as one line and exits 2."""


class ThinsliceError(Exception):
    """A problem with the user's input or set-up; the message says what to do."""

"""One exception type for user-facing problems: the CLI prints its message as one line and exits 2."""


class ThinsliceError(Exception):
    """A problem with the user's input or set-up; the message says what to do.

    ``details`` are extra lines a message refers to (e.g. the series of a folder, one per line): the command line
    prints them after the one-line error, so the error itself stays one line.
    """

    def __init__(self, message: str = "", *, details: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.details = tuple(details)


def os_reason(exc: OSError) -> str:
    """A short reason for an OS error ("No space left on device", "Read-only file system"), without the
    tracebacks that some libraries fold into the message."""
    import os

    if exc.strerror:
        return exc.strerror
    if exc.errno:
        return os.strerror(exc.errno)
    text = str(exc)
    for line in text.splitlines():
        if "Errno" in line:
            return line.split("]", 1)[-1].strip() or text
    return text.splitlines()[0] if text else type(exc).__name__

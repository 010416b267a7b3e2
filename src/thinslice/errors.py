"""One exception type for user-facing problems: the CLI prints its message as one line and exits 2."""


class ThinsliceError(Exception):
    """A problem with the user's input or set-up; the message says what to do."""


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

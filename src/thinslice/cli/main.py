"""Entry point of the ``thinslice`` program.

Each sub-command lives in ``thinslice/cli/cmd_<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code. Discovery keeps
sub-commands independent of one another and of this file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
import warnings

import thinslice
import thinslice.cli as cli_pkg
from thinslice.errors import ThinsliceError, os_reason


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thinslice",
        description="Thick-slice to thin-slice CT: simulate, upsample (interpolation, CNN, latent diffusion), score.",
    )
    parser.add_argument("--version", action="version", version=f"thinslice {thinslice.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug messages too")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"thinslice.cli.{info.name}").register(subparsers)
    return parser


class Terminated(BaseException):
    """SIGTERM as an exception, so that ``finally`` blocks remove temporary files before the process ends."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


class _OneLine(logging.Formatter):
    """``thinslice CMD: message`` for information, ``thinslice CMD: warning: message`` for the rest."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"thinslice {self.command}: {level}{record.getMessage()}"


def process_rank() -> int:
    """This process's rank when started by torchrun or ``accelerate launch`` (``RANK``) or mpirun, else 0."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        try:
            if os.environ.get(name):
                return int(os.environ[name])
        except ValueError:
            continue
    return 0


def _setup_logging(verbose: int, quiet: bool, command: str) -> None:
    """Library code logs; the command line shows its information and warnings as one line each (-q: errors only,
    -v: debug). Of several training processes only the first (rank 0) shows information and warnings, Python's
    warnings included, so each line appears once; every process still shows its errors."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    if process_rank() != 0:
        level = logging.ERROR
        warnings.filterwarnings("ignore")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(command))
    root = logging.getLogger("thinslice")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    command = "?"
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse's one-line usage error (2) or --help (0): an exit code, as for the rest
            return exc.code if isinstance(exc.code, int) else 2
        command = args.command or "?"
        _setup_logging(args.verbose, args.quiet, command)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except ThinsliceError as exc:
        rank = process_rank()
        where = f" (process {rank})" if rank else ""
        print(f"thinslice {command}: error{where}: {exc}", file=sys.stderr)
        for line in exc.details:
            print(f"  {line}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"thinslice {command}: error: out of memory; free memory, run fewer jobs at once, or for cnn/ldm "
              "give a smaller --patch-size", file=sys.stderr)
        return 3
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head -1`): stop quietly, like other command-line tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"thinslice {command}: error: {os_reason(exc)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"thinslice {command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"thinslice {command}: terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of the ``thinslice`` program.

Each sub-command lives in ``thinslice/cli/cmd_<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code. Discovery keeps
sub-commands independent of one another and of this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import thinslice
import thinslice.cli as cli_pkg
from thinslice.errors import ThinsliceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thinslice",
        description="Thick-slice to thin-slice CT: simulate, upsample (interpolation, CNN, latent diffusion), score.",
    )
    parser.add_argument("--version", action="version", version=f"thinslice {thinslice.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"thinslice.cli.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ThinsliceError as exc:
        print(f"thinslice {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"thinslice {args.command}: error: out of memory; use patch-wise processing (--patch-size) or a "
              "smaller volume", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"thinslice {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

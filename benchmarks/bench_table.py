"""The benchmark table of the README: ``python benchmarks/bench_table.py --data DIR_OR_FILES [--out DIR]``.

Same as ``thinslice bench`` (every method on every simulated case, one table, JSON, Markdown and a PNG); kept here
so that the numbers in the README can be reproduced from the repository with one command.
"""

import sys

from thinslice.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

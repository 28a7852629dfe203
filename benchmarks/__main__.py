"""``python -m benchmarks [--quick | --tiny] [--json PATH]``: decisions per second evaluating and learning,
cost against active size (pruned organism) and peak memory per organism; see benchmarks/decisions.py.

Progress goes to stderr; the table and then the JSON report go to stdout, and the JSON is also
written to PATH when given.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import emit
from benchmarks.decisions import Settings, run_all, table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Organism vs naive SNN on one core: decisions/s evaluating and "
                                     "learning, pruned vs grown organism, peak RSS per organism.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer sizes and repeats (about a minute)")
    size.add_argument("--tiny", action="store_true",
                      help="every measurement once at tiny sizes, in seconds (for the tests: the figures mean nothing)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the JSON report here")
    args = parser.parse_args(argv)
    settings = Settings.tiny() if args.tiny else Settings.quick() if args.quick else Settings()
    report = run_all(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(report))
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

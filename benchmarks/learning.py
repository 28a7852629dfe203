"""``python -m benchmarks.learning [--hidden H ...] [--batch B ...] [--rule R ...] [--repeats N]
[--times K] [--json PATH]``: learning against evaluation only, the ``organism_learning`` section of
``python -m benchmarks`` (``benchmarks.decisions.measure_learning``) at chosen sizes, K times in a
row. For checking a change to the learning path in a minute instead of five: run it on the code
before and after the change, in turns, and compare the ratios (this machine's rates drift; each
ratio is timed side by side with evaluation, so it drifts less).

Progress goes to stderr; one line per measurement and then the JSON report go to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import asdict

from benchmarks import emit
from benchmarks.decisions import LEARNING_RULES, Settings, machine, measure_learning


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--hidden", type=positive_int, nargs="+", default=[512], help="hidden sizes (default 512)")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[16], help="worlds per step (default 16)")
    parser.add_argument("--rule", choices=LEARNING_RULES, nargs="+", default=list(LEARNING_RULES))
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed repeats per rate (default 7)")
    parser.add_argument("--repeat-seconds", type=float, default=Settings.repeat_seconds,
                        help=f"about this long per timed repeat (default {Settings.repeat_seconds})")
    parser.add_argument("--times", type=positive_int, default=1, help="measure each size this many times in a row")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the JSON report here")
    args = parser.parse_args(argv)
    if not args.repeat_seconds > 0:
        parser.error(f"--repeat-seconds must be positive, got {args.repeat_seconds}")

    settings = Settings(repeats=args.repeats, repeat_seconds=args.repeat_seconds, learning_rules=tuple(args.rule))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "settings": asdict(settings), "organism_learning": []}
    for hidden in args.hidden:
        for batch in args.batch:
            for time in range(args.times):
                print(f"learning H={hidden} B={batch} ({', '.join(args.rule)}) {time + 1}/{args.times} ...",
                      file=sys.stderr, flush=True)
                measured = measure_learning(hidden, batch, settings)
                report["organism_learning"].append(measured)
                ratios = "  ".join(f"{rule} {r['learning_over_eval']:.3f}" for rule, r in measured["rules"].items())
                print(f"H={hidden} B={batch}: learning/eval {ratios}  (eval {measured['eval_full_loop']['median']:,.0f} "
                      f"decisions/s)", flush=True)
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

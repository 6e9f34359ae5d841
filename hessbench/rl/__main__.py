"""``python -m hessbench.rl run SUITE [-o DIR] [-j N]`` and ``... report RUN_DIR [-o DIR]``.

The same entry points ``hessbench run`` / ``hessbench report`` use for rl suites.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hessbench.errors import HessbenchError
from hessbench.rl.cli import rl_report_command, run_rl_command


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the command; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m hessbench.rl")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) an rl suite")
    run.add_argument("suite", type=Path)
    run.add_argument("-o", "--output", type=Path, default=None)
    run.add_argument("-j", "--jobs", type=int, default=1)
    report = sub.add_parser("report", help="write the report of an rl run folder")
    report.add_argument("run_dir", type=Path)
    report.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run_rl_command(args.suite, args.output, args.jobs)
        return rl_report_command(args.run_dir, args.output)
    except HessbenchError as exc:
        print(f"hessbench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

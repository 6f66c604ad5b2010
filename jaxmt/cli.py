"""``python -m jaxmt SUBCOMMAND``: the command line.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> exit code``; this file only lists them, so ``--help`` stays cheap (modules are
imported when their subcommand runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("jaxmt.train_cli", "train many small models (a hyperparameter search on digits) as one program"),
    "soak": ("jaxmt.soak", "soak test: many threads and tenants, tenants churning; checks nothing is lost or wrong"),
    "demo": ("jaxmt.demo", "serve a few dozen small ResNets as one program and compare with baselines"),
    "batch": ("jaxmt.batch", "predict a manifest of (tenant, input file) entries from a store checkpoint, resumably"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments (None: none)."""
    parser = argparse.ArgumentParser(prog="python -m jaxmt", description="Many models of one architecture as one XLA program.")
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxmt`` (and the ``jaxmt`` script): parses ``argv`` and runs its subcommand;
    returns the exit code (2 without a subcommand, 130 on Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level takes no option values
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a crash: one line, the shell's code for SIGINT
        print(f"interrupted: {args.command} stopped before it finished", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

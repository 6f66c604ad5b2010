#!/usr/bin/env python
"""Train many small models on scikit-learn's digits as one program: ``python -m jaxmt train``.

A thin wrapper for running from a checkout without installing jaxmt; every option and the
exit codes are those of the subcommand (see --help).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxmt import train_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_many.py", description=train_cli.__doc__.split("\n\n")[0])
    train_cli.add_arguments(parser)
    return train_cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Batch predictions for a manifest of (tenant, input file) entries: ``python -m jaxmt batch``.

A thin wrapper for running from a checkout without installing jaxmt; every option and the
exit codes are those of the subcommand (see --help).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxmt import batch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batch_predict.py")
    batch.add_arguments(parser)
    return batch.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

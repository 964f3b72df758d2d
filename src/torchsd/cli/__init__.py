"""``torchsd <command>``: each command is a module with ``add_parser(subparsers)``; ``generate.py`` holds
the generation flags the drawing commands share.

Errors a user can fix (bad sizes, unknown samplers, unreadable files) print one line and exit with 2;
no output file is written unless the whole run succeeded.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command modules, in the order `torchsd --help` lists them
COMMANDS = ["torchsd.cli.generate"]
EXTRA_COMMANDS: list[str] = [
    "torchsd.cli.convert",
    "torchsd.training.cli",
    "torchsd.cli.a1111",
    "torchsd.server.cli",
    "torchsd.explain.cli",
]

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchsd", description="Stable Diffusion from scratch on PyTorch")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS + EXTRA_COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"torchsd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchsd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

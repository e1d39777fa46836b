"""What every workflow command shares: the SPEC argument, `--set KEY=VALUE` overrides, and one way to fail on a
bad spec (a message naming the key, exit code 2, no traceback)."""

from __future__ import annotations

import argparse
import sys

from components.spec import Spec, SpecError, load_spec


def add_spec_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """SPEC (positional), or `--spec` with `default` for commands that have one (the benchmarks)."""
    if default is None:
        parser.add_argument("spec", help="a spec file, e.g. specs/smollm2-135m.yaml")
    else:
        parser.add_argument("--spec", default=default, help=f"a spec file (default: {default})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key (dotted path)")


def spec_from_args(args: argparse.Namespace) -> Spec | None:
    """The validated spec, or None after printing what is wrong (the caller exits with 2)."""
    try:
        return load_spec(args.spec, args.set)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return None

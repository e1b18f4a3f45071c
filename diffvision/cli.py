"""The ``diffvision`` console script."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffvision",
        description="diffvision: differential attention for vision models. Training through "
                    "LightningCLI (fit/validate/test/predict) lands with the training issue.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__
        print(__version__)
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

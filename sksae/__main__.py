"""Command-line interface: ``python -m sksae COMMAND``."""

from __future__ import annotations

import argparse
import sys


def _demo(args):
    from ._demo import run_demo

    figure = None
    if not args.no_figure:
        try:
            import matplotlib  # noqa: F401

            figure = args.figure
        except ImportError:
            print("(matplotlib is not installed: no summary figure)")
    run_demo(n_samples=args.n_samples, device=args.device, random_state=args.random_state,
             verbose=args.verbose, figure=figure)
    return 0


def build_parser():
    """The argument parser of ``python -m sksae``."""
    parser = argparse.ArgumentParser(prog="python -m sksae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit an SAE and scikit-learn's dictionary learning "
                                       "on toy superposition data and compare them")
    demo.add_argument("--n-samples", type=int, default=20_000)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--random-state", type=int, default=0)
    demo.add_argument("--figure", default="sksae_demo.png",
                      help="path of the PNG summary figure (default: %(default)s)")
    demo.add_argument("--no-figure", action="store_true", help="do not write the figure")
    demo.add_argument("-v", "--verbose", action="count", default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None):
    """Entry point of ``python -m sksae`` and of the ``sksae`` script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m rmsprop_jax <command> [flags]`` (or ``rmsprop-jax``).

Each subcommand lives in its own module and is imported only when it runs,
so ``--help`` stays fast and a missing optional extra only affects its own
command.  To add one (e.g. ``bench`` or ``conformance``), write a
``_add_<name>(subparsers)`` function below and list it in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    from rmsprop_jax.cli import demo

    parser = subparsers.add_parser(
        "demo",
        help="train a small MLP on sklearn digits and plot the loss curve",
        description=demo.DESCRIPTION,
    )
    demo.add_arguments(parser)
    parser.set_defaults(func=demo.run)


def _add_conformance(subparsers: argparse._SubParsersAction) -> None:
    from rmsprop_jax.cli import conformance

    parser = subparsers.add_parser(
        "conformance",
        help="run every installed peer (torch, optax, keras, ...) side by side with our presets",
        description=conformance.__doc__.split("\n\n")[0],
    )
    conformance.add_arguments(parser)
    parser.set_defaults(func=conformance.main)


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from rmsprop_jax.cli import bench

    parser = subparsers.add_parser(
        "bench",
        help="time one optimizer step against optax, Keras, PyTorch and the memory floor",
        description=bench.DESCRIPTION,
    )
    bench.add_arguments(parser)
    parser.set_defaults(func=bench.main)


def _add_parity(subparsers: argparse._SubParsersAction) -> None:
    from rmsprop_jax.cli import parity

    parser = subparsers.add_parser(
        "parity",
        help="final training loss with float32, bfloat16 and int8 optimizer state",
        description=parity.DESCRIPTION,
    )
    parity.add_arguments(parser)
    parser.set_defaults(func=parity.main)


_COMMANDS = (_add_demo, _add_conformance, _add_bench, _add_parity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rmsprop_jax",
        description="rmsprop_jax command line tools.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

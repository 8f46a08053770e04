"""Command line: ``python -m rmsprop_jax <command> [flags]`` (or ``rmsprop-jax``).

Each command is a module of :mod:`rmsprop_jax.cli` with a ``DESCRIPTION``, an
``add_arguments(parser)`` and an entry point taking the parsed arguments. To add
one, write the module and list it in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

# (command = module of rmsprop_jax.cli, one-line help, entry point)
COMMANDS = (
    ("demo", "train a small MLP on sklearn digits and plot the loss curve", "run"),
    (
        "conformance",
        "run every installed peer (torch, optax, keras, ...) side by side with our presets",
        "main",
    ),
    (
        "bench",
        "time one optimizer step against optax, Keras, PyTorch and the memory floor",
        "main",
    ),
    ("parity", "final training loss with float32, bfloat16 and int8 optimizer state", "main"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rmsprop_jax",
        description="rmsprop_jax command line tools.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, entry in COMMANDS:
        module = importlib.import_module(f"rmsprop_jax.cli.{name}")
        command = subparsers.add_parser(name, help=help_text, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(func=getattr(module, entry))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

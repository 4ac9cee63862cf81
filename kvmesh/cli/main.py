"""`kvmesh` entry point. Each subcommand lives in its own module with `add_parser` and `run`."""

from __future__ import annotations

import importlib
import sys

import kvmesh
from kvmesh.serving.config import EnvArgumentParser

# subcommand -> module (kept lazy: `kvmesh generate` must not import torch)
SUBCOMMANDS = {
    "generate": "kvmesh.cli.generate",
    "up": "kvmesh.cli.up",
    "health": "kvmesh.cli.health",
}


def main(argv: list[str] | None = None) -> int:
    parser = EnvArgumentParser(prog="kvmesh", description="kvmesh client and local-cluster commands")
    parser.add_argument("--version", action="version", version=f"%(prog)s {kvmesh.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_parser(subparsers)
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

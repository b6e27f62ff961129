"""Command line: ``python -m pytest_gpucap genmodel OUT.gguf [shape options]``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"genmodel": "generate a small random-weight GGUF model"}
    if not args or args[0] not in commands:
        print("usage: python -m pytest_gpucap COMMAND ...\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:<10} {text}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    from .modelgen import main as genmodel

    return genmodel(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())

"""Command line: ``python -m pytest_gpucap COMMAND``: genmodel, report, compare, restore."""

from __future__ import annotations

import sys
from pathlib import Path

COMMANDS = {
    "genmodel": "generate a small random-weight GGUF model",
    "report": "re-render DIR/capacity.md and DIR/capacity.html from DIR/results.jsonl; OLD NEW: side by side",
    "compare": "per-config deltas between two runs (OLD NEW [--fail-on-regression PCT])",
    "restore": "start the services a killed session left stopped (DIR: its --gpucap-report dir or rootdir; default .)",
}


def _usage() -> str:
    lines = ["usage: python -m pytest_gpucap COMMAND ...", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def report_main(argv: list[str]) -> int:
    """``report DIR``: exit 2 with one line when there is nothing to render."""
    import argparse

    from .report import ReportError, render_report

    p = argparse.ArgumentParser(prog="python -m pytest_gpucap report", description=COMMANDS["report"])
    p.add_argument("dir", type=Path, help="report directory holding results.jsonl")
    p.add_argument("new", type=Path, nargs="?", default=None,
                   help="a second run: write NEW/compare.html with both runs side by side, regressions first")
    args = p.parse_args(argv)
    if args.new is not None:
        from .compare import main as compare_main

        out = (args.new if args.new.is_dir() else args.new.parent) / "compare.html"
        return compare_main([str(args.dir), str(args.new), "--html", str(out)])
    try:
        written = render_report(args.dir)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written[:2]:
        print(path)
    if len(written) > 2:
        print(f"{len(written) - 2} chart(s) in {written[2].parent}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(_usage())
        return 0 if args and args[0] in ("-h", "--help") else 2
    command, rest = args[0], args[1:]
    if command == "report":
        return report_main(rest)
    if command == "restore":
        from .host_routine import restore_main

        if rest[:1] in (["-h"], ["--help"]) or len(rest) > 1:
            print(f"usage: python -m pytest_gpucap restore [DIR]\n\n{COMMANDS['restore']}")
            return 0 if rest[:1] in (["-h"], ["--help"]) else 2
        return restore_main(Path(rest[0] if rest else "."))
    if command == "compare":
        from .compare import main as compare_main

        return compare_main(rest)
    from .modelgen import main as genmodel

    return genmodel(rest)


if __name__ == "__main__":
    raise SystemExit(main())

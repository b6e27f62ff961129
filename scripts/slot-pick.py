#!/usr/bin/env python3
"""How often llama-server puts a second agent in the first agent's slot at low concurrency.

Boots a fresh two-slot llama-server on the generated thinking model RUNS times, runs one Research and one
ToolStorm agent for three turns, and counts the runs in which a Research turn did not find its whole
previous prompt in the cache (its slot went to the other agent). Extra arguments go to llama-server, e.g.
``--slot-prompt-similarity 0``. Figures behind the README's note on the slot pick ("How it measures").

    .venv/bin/python scripts/slot-pick.py [RUNS] [-- llama-server args...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from pytest_gpucap.backends import LaunchSpec, ServerHandle
from pytest_gpucap.backends.llamacpp import find_binary
from pytest_gpucap.matrix import CapacityConfig, HostProfile, Workload
from pytest_gpucap.modelgen import ModelShape, ensure_model
from pytest_gpucap.probes import HostProbe
from pytest_gpucap.workload import runner
from pytest_gpucap.workload.prompts import calibrate
from pytest_gpucap.workload.roles import Role

SETTINGS = Workload(duration_s=60, max_turns=3, request_timeout_s=60, stall_s=30)


def one_run(binary: Path, model: Path, extra: tuple[str, ...]) -> list[tuple[int, int]]:
    """(cached tokens of turn t+1, prompt tokens of turn t) for the Research agent, on a fresh server."""
    cfg = CapacityConfig(profile="cpu", n=2, ctx=1024, threads=2, cache_ram_mib=0,
                         chat_template_kwargs='{"enable_thinking":true}', extra_args=extra)
    with tempfile.TemporaryDirectory() as logs:
        spec = LaunchSpec(config=cfg, profile=HostProfile(name="cpu", memory_gib=2.0), log_dir=Path(logs),
                          command=(str(binary),), model=model, boot_timeout_s=60, hold_s=0.2)
        handle = ServerHandle(spec, HostProbe(2048))
        try:
            handle.boot()
            roles = [Role("Research", None, 24, 48, thinking=True), Role("ToolStorm", None, 24, 48, thinking=False)]
            res = runner.run(runner.run_agents(handle.url, roles, SETTINGS, cfg.ctx, calibrate(handle.url)[0]))
        finally:
            handle.stop()
    turns = sorted((r for r in res.records if r.role == "Research"), key=lambda r: r.turn)
    return [(b.cached_tokens or 0, a.prompt_tokens or 0) for a, b in zip(turns, turns[1:])]


def main(argv: list[str]) -> int:
    extra = tuple(argv[argv.index("--") + 1:]) if "--" in argv else ()
    head = argv[: argv.index("--")] if "--" in argv else argv
    runs = int(head[0]) if head else 10
    found = find_binary(None)
    if found.path is None:
        print(f"slot-pick: no llama-server ({found.source})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as models:
        model = ensure_model(ModelShape(name="gpucap-think", chat_template="thinking"), Path(models))
        evicted = 0
        for i in range(runs):
            pairs = one_run(found.path, model, extra)
            bad = any(cached < prompt for cached, prompt in pairs)
            evicted += bad
            print(f"run {i}: (cached, previous prompt) {pairs}{'  slot taken' if bad else ''}", flush=True)
    print(f"slot taken by the other agent in {evicted} of {runs} runs (llama-server args: {list(extra) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

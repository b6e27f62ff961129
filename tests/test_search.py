"""Capacity search: same knee as the full grid, far fewer boots; known results reused.

The pure tests drive the search with a fake, monotone ``evaluate``; the last test boots the real
llama-server for every point of a grid and again for the search, and compares.
"""

from __future__ import annotations

import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from pytest_gpucap import prediction as mm
from pytest_gpucap.matrix import CapacityConfig, HostProfile, SLO
from pytest_gpucap.modelgen import ModelShape, ensure_model
from pytest_gpucap.record_calibration import calibrate_from
from pytest_gpucap.search import Outcome, SearchSpace, grid_search, monotonicity_violations, search_capacity
from pytest_gpucap.search_known import known_outcomes, reusable_records
from pytest_gpucap.search_boot import boot_and_check
from pytest_gpucap.backends import LaunchSpec

from conftest import CapacityRun, matrix_toml

BASE = CapacityConfig(profile="cpu", n=1, ctx=1024, threads=1, cache_ram_mib=0, flash_attn="on")
SPACE = SearchSpace(ns=(1, 2, 3, 4, 6, 8, 12, 16), ctxs=(1024, 2048, 4096, 8192), cache_types=("f16", "q8_0"))
BYTES = {"f16": 1.0, "q8_0": 34 / 64}


def cost(cfg: CapacityConfig) -> float:
    return cfg.n * cfg.ctx * BYTES[cfg.cache_type_k]


class Fake:
    """A monotone SLO: fits while N x ctx x bytes/elem <= budget and N <= max_n; counts calls."""

    def __init__(self, budget: float, max_n: int = 10**6) -> None:
        self.budget, self.max_n, self.calls = budget, max_n, []

    def __call__(self, cfg: CapacityConfig) -> Outcome:
        self.calls.append(cfg.id)
        return Outcome(cost(cfg) <= self.budget and cfg.n <= self.max_n, reason=f"cost {cost(cfg):.0f}")


def fake_predict(budget: float, noise: float = 0.0, seed: int = 0, fit_factor: float = 4.0):
    """Predictions with a controllable error: predicted used = cost x (1 +- noise) on a device of
    ``fit_factor x budget``, with a headroom SLO that passes while used <= budget."""
    rng = random.Random(seed)
    profile = HostProfile(name="cpu", memory_gib=1.0, slo=SLO(headroom_gib=0.0))
    facts = mm.facts_from_shape(ModelShape())

    def predict(cfg: CapacityConfig) -> mm.Prediction:
        pred = mm.predict(cfg, facts, profile=profile)
        used = cost(cfg) * (1 + noise * rng.uniform(-1, 1))
        return replace(pred, free_mib=fit_factor * budget - used, headroom_gib=(fit_factor - 1) * budget / 1024)

    return predict


@pytest.mark.parametrize("budget, max_n", [(2048, 10**6), (8192, 4), (20000, 10**6), (65536, 8), (10**9, 10**6),
                                           (100, 10**6), (40000, 3)])
@pytest.mark.parametrize("noise", [None, 0.0, 0.3])
@pytest.mark.parametrize("strategy", ["split", "columns"])
def test_search_finds_the_grid_knee(budget: float, max_n: int, noise: float | None, strategy: str) -> None:
    grid = grid_search(BASE, SPACE, Fake(budget, max_n))
    fake = Fake(budget, max_n)
    predict = None if noise is None else fake_predict(budget, noise)
    result = search_capacity(BASE, SPACE, fake, predict=predict, strategy=strategy)
    assert (result.knee and result.knee.id) == (grid.knee and grid.knee.id)
    assert result.boots == len(fake.calls) == len(set(fake.calls))  # never boots a point twice
    assert grid.boots == SPACE.size == 64
    assert result.boots <= 0.4 * grid.boots, result.table()
    if noise == 0.0 and max_n > 100:  # an accurate prediction leads almost straight to the knee
        assert result.boots <= 0.2 * grid.boots, result.table()
    statuses = {p.status for p in result.probes}
    assert statuses <= {"booted-pass", "booted-fail", "inferred-pass", "inferred-fail", "predicted-no-fit",
                        "not-needed"}
    assert not monotonicity_violations(grid)


def test_random_monotone_spaces_agree_with_the_grid() -> None:
    """Random grids, budgets and a constraint on N the prediction does not know about."""
    rng = random.Random(7)
    worst = 0.0
    for _ in range(150):
        space = SearchSpace(ns=tuple(sorted(rng.sample(range(1, 40), rng.randint(1, 9)))),
                            ctxs=tuple(sorted(rng.sample([512 * k for k in range(1, 33)], rng.randint(1, 6)))),
                            cache_types=tuple(rng.sample(["f16", "q8_0"], rng.randint(1, 2))))
        budget, max_n = rng.choice([500, 5_000, 50_000, 500_000, 10**9]), rng.choice([2, 8, 10**6])
        grid = grid_search(BASE, space, Fake(budget, max_n))
        result = search_capacity(BASE, space, Fake(budget, max_n), predict=fake_predict(budget, 0.2, rng.random()))
        assert (result.knee and result.knee.id) == (grid.knee and grid.knee.id)
        worst = max(worst, result.boot_fraction if space.size >= 16 else 0)
    assert worst <= 0.4


def test_pruned_configs_are_never_booted() -> None:
    fake = Fake(8192)
    result = search_capacity(BASE, SPACE, fake, predict=fake_predict(8192, fit_factor=1.0))
    pruned = [p for p in result.probes if p.status == "predicted-no-fit"]
    assert pruned and all(p.boot_order is None and p.config.id not in fake.calls for p in pruned)
    assert all("predicted not to fit" in p.reason for p in pruned)
    slo = search_capacity(BASE, SPACE, Fake(8192), predict=fake_predict(8192, fit_factor=10), prune="slo")
    assert any(p.status == "predicted-slo-miss" for p in slo.probes)
    assert slo.knee is not None and slo.knee.id == result.knee.id


def test_known_results_are_reused_and_cost_no_boots() -> None:
    fake = Fake(16384)
    first = search_capacity(BASE, SPACE, fake)
    known = {p.config.id: p.outcome for p in first.probes if p.outcome is not None}
    again = Fake(16384)
    second = search_capacity(BASE, SPACE, again, known=known)
    assert second.boots == 0 and again.calls == [] and second.knee == first.knee
    assert second.known_used == len(known)
    every = {cfg.id: Fake(16384)(cfg) for cfg in SPACE.configs(BASE)}
    third = search_capacity(BASE, SPACE, Fake(16384), known=every)
    assert third.boots == 0 and third.known_used == SPACE.size and third.knee == first.knee
    assert {p.status for p in third.probes} <= {"known-pass", "known-fail"}


def test_known_outcomes_from_records() -> None:
    def rec(cid: str, kind: str, ok: bool, free: float | None = None) -> dict[str, Any]:
        r: dict[str, Any] = {"config_id": cid, "kind": kind,
                             "verdicts": [{"name": "headroom", "measured": 1.0, "budget": 0.5, "ok": ok}]}
        if free is not None:
            r["memory"] = {"free_mib": free}
        return r

    records = [rec("a", "ceiling", True, free=700), rec("a", "workload", False), rec("b", "ceiling", True, free=700),
               rec("c", "ceiling", False, free=100)]
    out = known_outcomes(records)
    assert (out["a"].passed, out["b"].passed, out["c"].passed) == (False, True, False)
    strict = known_outcomes(records, slo=SLO(headroom_gib=1.0))
    assert not strict["b"].passed and "re-judged" in strict["b"].reason


def test_skipped_and_unmeasured_records_as_known_outcomes() -> None:
    """A skipped test measured nothing, so it decides nothing; a boot failure is a failed config."""
    records = [{"config_id": "a", "kind": "ceiling", "outcome": "skipped", "reason": "llama-server not found"},
               {"config_id": "b", "kind": "ceiling", "outcome": "failed", "reason": "boot failed: exit 1"}]
    out = known_outcomes(records)
    assert "a" not in out
    assert not out["b"].passed and "boot failed: exit 1" in out["b"].reason


def test_reusable_records_match_host_build_model_and_fixed_knobs() -> None:
    host = {"python": "3.12.0", "device": "host", "ram_gib": "23.4"}

    def rec(cfg: CapacityConfig, **changes: Any) -> dict[str, Any]:
        base = {"kind": "ceiling", "config_id": cfg.id, "config": asdict(cfg),
                "host": dict(host), "server": {"version": "b1", "model": "/m.gguf"}, "memory": {"free_mib": 1.0}}
        return base | changes

    same = rec(replace(BASE, n=4, ctx=2048, cache_type_k="q8_0", cache_type_v="q8_0"))
    others = [rec(replace(BASE, n=2, threads=2)),  # a knob the search does not vary differs
              rec(BASE, host=host | {"ram_gib": "8.0"}), rec(BASE, server={"version": "b2", "model": "/m.gguf"}),
              rec(BASE, server={"version": "b1", "model": "/other.gguf"}), rec(BASE, memory=None),
              rec(BASE, kind="workload")]
    assert reusable_records([same, *others], BASE, host, "b1", "/m.gguf") == [same]


def test_evaluation_errors_fail_the_point_and_max_boots_stops() -> None:
    def boom(cfg: CapacityConfig) -> Outcome:
        if cfg.n >= 4:
            raise RuntimeError("server crashed")
        return Outcome(True)

    result = search_capacity(BASE, SearchSpace(ns=(1, 2, 4, 8), ctxs=(1024,)), boom)
    assert result.knee is not None and result.knee.n == 2
    crashed = [p for p in result.probes if p.status == "booted-fail"]
    assert crashed and "server crashed" in crashed[0].reason
    limited = search_capacity(BASE, SPACE, Fake(10**9), max_boots=1)
    assert limited.boots == 1
    assert "knee:" in limited.table() and limited.as_dict()["boots"] == 1


# ---------------------------------------------------------------- real servers

#: 4 layers x 4 KV heads x 64 x f16 x (K+V): 4 KiB of KV per token, so KV dominates server RSS.
SEARCH_MODEL = ModelShape(n_layer=4, n_head_kv=4, name="gpucap-search")
#: A 256 MiB host budget and 64 MiB of headroom: passes while RSS <= 192 MiB (~40K tokens of KV).
SEARCH_PROFILE = HostProfile(name="cpu", memory_gib=0.25, hold_s=0.2, boot_timeout_s=60,
                             slo=SLO(headroom_gib=0.0625))
REAL_SPACE = SearchSpace(ns=(1, 2, 3, 4, 6, 8, 12, 16), ctxs=(1024, 2048, 4096, 8192))


def test_search_matches_full_grid_on_real_servers(llama_server_bin: Path, model_cache: Path, tmp_path: Path) -> None:
    """The knee from a full grid of real boots equals the search's, which uses at most 40% of the boots."""
    model = ensure_model(SEARCH_MODEL, model_cache)
    facts = mm.read_model_facts(model)

    def spec_factory(cfg: CapacityConfig) -> LaunchSpec:
        return LaunchSpec(config=cfg, profile=SEARCH_PROFILE, log_dir=tmp_path, command=(str(llama_server_bin),), model=model,
                          boot_timeout_s=60, hold_s=0.2)

    def evaluate(cfg: CapacityConfig) -> Outcome:
        return boot_and_check(cfg, spec_factory)

    def predict(cfg: CapacityConfig) -> mm.Prediction:
        return mm.predict(cfg, facts, profile=SEARCH_PROFILE)

    base = replace(BASE, profile="cpu")
    grid = grid_search(base, REAL_SPACE, evaluate)
    result = search_capacity(base, REAL_SPACE, evaluate, predict=predict)
    print(f"\nfull grid: knee {grid.knee and grid.knee.id}, {grid.boots} boots, {grid.seconds:.1f} s")
    print(result.table())
    assert grid.knee is not None and result.knee is not None
    assert result.knee.id == grid.knee.id
    assert 0 < result.boots <= 0.4 * grid.boots
    # the knee falls inside the grid: something larger failed
    assert any(p.passed is False for p in grid.probes) and any(p.passed for p in grid.probes)
    assert not monotonicity_violations(grid)
    # every booted point of the search agrees with the grid's verdict for it
    for p in result.booted():
        assert p.passed == grid.probe(p.config.id).passed, p.config.id
    # the search's records feed the calibration and the next search
    records = [p.outcome.record for p in result.booted() if p.outcome and p.outcome.record]
    assert records and calibrate_from(records).for_profile("cpu") is not None
    again = search_capacity(base, REAL_SPACE, evaluate, predict=predict,
                            known=known_outcomes(records))
    assert again.boots == 0 and again.knee == result.knee


SEARCH_TEST = """
import pytest


@pytest.mark.gpucap_search(profile="cpu", ns=[1, 2, 4], ctxs=[1024, 2048], max_boots=6,
                           probe={"workflow": "A", "duration_s": 2})
def test_knee(gpucap_search):
    result = gpucap_search.run(prune="none")
    print(f"\\nsearch: {result.boots} boots, {result.known_used} known, knee {result.knee and result.knee.id}")
"""


def test_search_reuses_the_report_dirs_earlier_run(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """Run the same search twice into one report directory: the second boots nothing (the probes' ceiling
    and workflow-A records answer for every SLO)."""
    matrix = matrix_toml(tiny_model, "", extra="[profiles.cpu.workload]\ntoken_scale = 0.01\ncadence_scale = 0.02\n")
    first = capacity_run.run(matrix, "-s", "--gpucap-report", "rep", test_src=SEARCH_TEST)
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["search: * boots, 0 known, knee cpu-n*"])
    boots = int(first.stdout.str().split("search: ")[1].split(" boots")[0])
    assert boots > 0
    second = capacity_run.run(matrix, "-s", "--gpucap-report", "rep", test_src=SEARCH_TEST)
    second.assert_outcomes(passed=1)
    knee = first.stdout.str().split("knee ")[1].split()[0]
    second.stdout.fnmatch_lines([f"search: 0 boots, {boots} known, knee {knee}"])
    assert list((capacity_run.pytester.path / "rep").glob("results-*.jsonl"))  # the earlier run was kept

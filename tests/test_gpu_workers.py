"""``--gpucap-gpus``: one xdist worker per card, each config on its worker's card (or its own ``gpus``),
never two servers on one card at a time."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from conftest import THREE_CONFIGS, TWO_TESTS_PER_CONFIG, CapacityRun, matrix_toml

from pytest_gpucap import records
from pytest_gpucap.pinning import detect_gpus

BOTH_CARDS = """
    [[profiles.cpu.configs]]
    n = 1
    ctx = 512
    gpus = [0, 1]
"""


def overlaps_per_card(recs: list[dict]) -> list[tuple[str, str, str]]:
    """(card, config, config) for two configs pinned to one card whose servers were up at the same time:
    from the moment each took its cards (``up_at``) to its last record."""
    spans: dict[str, list[float]] = defaultdict(list)
    cards: dict[str, set[str]] = {}
    for r in recs:
        spans[r["config_id"]] += [r["server"]["up_at"], r["recorded_at"]]
        cards[r["config_id"]] = set(r["server"]["device"].split("+"))
    span = {cid: (min(v), max(v)) for cid, v in spans.items()}
    ids = sorted(span)
    return [(card, a, b) for i, a in enumerate(ids) for b in ids[i + 1:] for card in sorted(cards[a] & cards[b])
            if span[a][0] < span[b][1] and span[b][0] < span[a][1]]


def test_two_workers_two_cards_each_config_once_never_two_servers_on_a_card(capacity_run: CapacityRun,
                                                                            tiny_model: Path) -> None:
    log_dir = capacity_run.pytester.path / "logs"
    result = capacity_run.run(matrix_toml(tiny_model, THREE_CONFIGS + BOTH_CARDS), "-n", "2", "--gpucap-gpus", "0,1",
                              "--gpucap-report", "rep", "--gpucap-log-dir", str(log_dir),
                              test_src=TWO_TESTS_PER_CONFIG, timeout=360)
    result.assert_outcomes(passed=12)
    recs = records.read_jsonl(capacity_run.pytester.path / "rep" / "results.jsonl")
    ups: dict[str, set[float]] = defaultdict(set)
    for r in recs:
        ups[r["config_id"]].add(r["server"]["up_at"])
    assert len(ups) == 4 and all(len(u) == 1 for u in ups.values()), ups  # each config booted once
    assert sorted(p.name.rsplit("-", 2)[0] for p in log_dir.iterdir()) == sorted(ups)  # one server log each
    devices = {r["config_id"]: (r["server"]["device"], r["server"]["visible_devices"]) for r in recs}
    assert devices["cpu-n1-ctx512-f16-gpu0+1"] == ("gpu0+gpu1", "0,1")
    singles = {dev for cid, (dev, _) in devices.items() if not cid.endswith("gpu0+1")}
    assert singles == {"gpu0", "gpu1"}, devices  # each worker ran configs on its own card
    assert all(vis == dev.removeprefix("gpu") for cid, (dev, vis) in devices.items() if dev in singles)
    assert overlaps_per_card(recs) == []


def test_overlap_check_sees_two_servers_on_one_card() -> None:
    """The check above can fail: two configs on gpu0 whose up-times cross."""
    def rec(cid: str, dev: str, up: float, at: float) -> dict:
        return {"config_id": cid, "recorded_at": at, "server": {"up_at": up, "device": dev}}
    recs = [rec("a", "gpu0", 0, 5), rec("b", "gpu0+gpu1", 4, 8), rec("c", "gpu1", 8.5, 9)]
    assert overlaps_per_card(recs) == [("gpu0", "a", "b")]


def test_n_auto_starts_one_worker_per_listed_card(pytester: pytest.Pytester, tiny_model: Path) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    pytester.makefile(".toml", gpucap=matrix_toml(tiny_model, ""))
    pytester.makepyfile(test_plain="def test_a():\n    pass\n")
    result = pytester.runpytest_subprocess("--gpucap-matrix", "gpucap.toml", "-n", "auto", "--gpucap-gpus", "0,2,3")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*3 workers*"])


def test_auto_lists_the_callers_cards_and_refuses_none(pytester: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == (0, 1)
    with pytest.raises(ValueError, match="no NVIDIA GPU found"):
        detect_gpus({"CUDA_VISIBLE_DEVICES": ""})
    pytester.makepyfile(test_plain="def test_a():\n    pass\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--gpucap-gpus", "auto")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--gpucap-gpus auto: no NVIDIA GPU found" in result.stderr.str()

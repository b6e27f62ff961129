"""Plain ``-n N``: each config boots once, and two servers never share a device unless the profile asks."""

from __future__ import annotations

import multiprocessing
import time
from collections import defaultdict
from pathlib import Path

from conftest import THREE_CONFIGS, TWO_TESTS_PER_CONFIG, CapacityRun, matrix_toml

from pytest_gpucap import records
from pytest_gpucap.files import DeviceLock



def _intervals(recs: list[dict]) -> dict[str, tuple[float, float]]:
    """Per config: from the moment its server took the device to its last record (inside its up-time)."""
    spans: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        spans[r["config_id"]] += [r["server"]["up_at"], r["recorded_at"]]
    return {cid: (min(v), max(v)) for cid, v in spans.items()}


def _overlapping(spans: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    ids = sorted(spans)
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
            if spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]]


def test_plain_n2_boots_each_config_once_and_one_server_at_a_time(capacity_run: CapacityRun,
                                                                  tiny_model: Path) -> None:
    log_dir = capacity_run.pytester.path / "logs"
    result = capacity_run.run(matrix_toml(tiny_model, THREE_CONFIGS), "-n", "2", "--gpucap-report", "rep",
                              "--gpucap-log-dir", str(log_dir), test_src=TWO_TESTS_PER_CONFIG)
    result.assert_outcomes(passed=9)
    result.stdout.fnmatch_lines(["*gpucap: -n without --dist: capacity configs run with --dist loadgroup*"])
    recs = records.read_jsonl(capacity_run.pytester.path / "rep" / "results.jsonl")
    assert len(recs) == 9
    boots = defaultdict(set)
    for r in recs:
        boots[r["config_id"]].add(r["server"]["up_at"])
        assert r["server"]["device"] == "host" and r["server"]["exclusive"] is True
    assert {cid: len(ups) for cid, ups in boots.items()} == {cid: 1 for cid in boots} and len(boots) == 3
    logs = defaultdict(int)
    for log in log_dir.iterdir():
        logs[log.name.rsplit("-", 2)[0]] += 1
    assert dict(logs) == {cid: 1 for cid in boots}
    assert _overlapping(_intervals(recs)) == []


def test_a_dist_the_user_chose_is_kept(capacity_run: CapacityRun, tiny_model: Path) -> None:
    result = capacity_run.run(matrix_toml(tiny_model, THREE_CONFIGS), "-n", "2", "--dist", "loadgroup",
                              test_src=TWO_TESTS_PER_CONFIG)
    result.assert_outcomes(passed=9)
    assert "capacity configs run with --dist loadgroup" not in result.stdout.str()


def test_exclusive_false_lets_configs_share_the_device(capacity_run: CapacityRun, tiny_model: Path) -> None:
    matrix = matrix_toml(tiny_model, THREE_CONFIGS).replace("hold_s = 0.5", "hold_s = 3\nexclusive = false")
    result = capacity_run.run(matrix, "-n", "2", "--gpucap-report", "rep", test_src=TWO_TESTS_PER_CONFIG)
    result.assert_outcomes(passed=9)
    recs = records.read_jsonl(capacity_run.pytester.path / "rep" / "results.jsonl")
    assert all(r["server"]["exclusive"] is False for r in recs)
    assert _overlapping(_intervals(recs)), "two workers' servers should have been up together"


def _hold(path: str, seconds: float, ready: "multiprocessing.Event") -> None:
    lock = DeviceLock(Path(path))
    lock.acquire()
    ready.set()
    time.sleep(seconds)
    lock.release()


def test_device_lock_waits_for_another_process_and_is_shared_within_one(tmp_path: Path) -> None:
    path = tmp_path / "device-host.lock"
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(str(path), 2.0, ready))
    holder.start()
    try:
        assert ready.wait(10)
        notes: list[float] = []
        lock = DeviceLock(path)
        waited = lock.acquire(notes.append, note_s=0.5)
        assert waited > 1.2 and notes and notes[0] >= 0.5
        again = DeviceLock(path)  # a second handle in this process: no wait on ourselves
        assert again.acquire() == 0.0
        again.release()
        lock.release()
        lock.release()  # idempotent
    finally:
        holder.join(10)
    # released: another process gets it at once
    ready2 = multiprocessing.Event()
    other = multiprocessing.Process(target=_hold, args=(str(path), 0.0, ready2))
    other.start()
    assert ready2.wait(5)
    other.join(5)

"""Vision images, the role image keys and burst table of the matrix, and the burst ceiling on a real server."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from pytest_gpucap.backends import LaunchSpec, ServerHandle
from pytest_gpucap.burst import FAILED_VERDICT, BurstResult, burst_verdicts, with_burst
from pytest_gpucap.ceiling import ceiling_record
from pytest_gpucap.matrix import SLO, Burst, CapacityConfig, HostProfile, MatrixError, Workload, parse_matrix
from pytest_gpucap.probes import HostProbe
from pytest_gpucap.records import parse
from pytest_gpucap.verdicts import FREE_MEMORY_VERDICT, headroom
from pytest_gpucap.workload.images import image_part, png_bytes, with_images
from pytest_gpucap.workload.roles import Role, roles_from_matrix


# ---------------------------------------------------------------- images

def test_images_are_deterministic_per_seed_and_sized_as_asked() -> None:
    png = png_bytes(7, (1000, 562))
    png_bytes.cache_clear()
    assert png_bytes(7, (1000, 562)) == png  # same bytes after the cache is gone
    assert png_bytes(8, (1000, 562)) != png
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (1000, 562) and img.format == "PNG" and img.mode == "RGB"
    with Image.open(io.BytesIO(png_bytes(7, (64, 32)))) as img:
        assert img.size == (64, 32)


def test_image_parts_are_openai_data_uris_beside_the_text() -> None:
    part = image_part(1, (32, 16))
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,iVBOR")
    content = with_images("look", ["a", "b"], (32, 16))
    assert [p["type"] for p in content] == ["text", "image_url", "image_url"] and content[0]["text"] == "look"
    assert with_images("look", [], (32, 16)) == "look"


def test_role_image_turns_follow_image_every() -> None:
    role = Role("V", None, 10, 10, images_per_turn=2, image_every=3)
    assert [role.images_on(t) for t in range(7)] == [2, 0, 0, 2, 0, 0, 2]
    assert Role("T", None, 10, 10).images_on(0) == 0


# ---------------------------------------------------------------- matrix keys

def _matrix(role: dict | None = None, burst: dict | None = None):
    data: dict = {"profiles": {"cpu": {"configs": [{"n": 1, "ctx": 512}]}}}
    if role is not None:
        data["roles"] = {"Vis": {"max_tokens": 10, "tool_tokens": 10, **role}}
    if burst is not None:
        data["profiles"]["cpu"]["burst"] = burst
    return parse_matrix(data, Path("m.toml"))


def test_role_image_keys_reach_the_role() -> None:
    m = _matrix({"images_per_turn": 1, "image_every": 2, "image_size": [640, 360]})
    role = roles_from_matrix(m.roles)["Vis"]
    assert (role.images_per_turn, role.image_every, role.image_size) == (1, 2, (640, 360))
    assert roles_from_matrix(_matrix({}).roles)["Vis"].image_size == (1000, 562)


@pytest.mark.parametrize("role, says", [
    ({"images_per_turn": -1}, "images_per_turn must be an integer >= 0"),
    ({"images_per_turn": "one"}, "images_per_turn must be an integer >= 0"),
    ({"image_every": 0}, "image_every must be a positive integer"),
    ({"image_size": [1000]}, "image_size must be [width, height]"),
    ({"image_size": [0, 562]}, "image_size must be [width, height]"),
    ({"image_sizes": [1, 1]}, "unknown key 'image_sizes'"),
])
def test_bad_role_image_keys_are_one_line_errors(role: dict, says: str) -> None:
    with pytest.raises(MatrixError, match=r"m\.toml: roles\.Vis") as exc:
        _matrix(role)
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_burst_table_and_its_errors() -> None:
    assert _matrix().profiles["cpu"].burst == Burst()
    got = _matrix(burst={"fill": 0.5, "reply_tokens": 100, "image": False, "enabled": True}).profiles["cpu"].burst
    assert got == Burst(enabled=True, fill=0.5, reply_tokens=100, image=False)
    for bad, says in (({"fill": 1.2}, "fill must be a share"), ({"fill": 0}, "fill must be a share"),
                      ({"reply_tokens": 0}, "reply_tokens must be a positive integer"),
                      ({"enabled": "yes"}, "enabled must be true or false"), ({"size": 1}, "unknown key 'size'")):
        with pytest.raises(MatrixError, match=r"profiles\.cpu\.burst") as exc:
            _matrix(burst=bad)
        assert says in str(exc.value)


# ---------------------------------------------------------------- the burst verdict

def _burst(min_free: float, failed: int = 0) -> BurstResult:
    return BurstResult(slots=2, fill=0.9, slot_ctx=512, target_prompt_tokens=460, reply_tokens=8, image=False,
                       failed=failed, min_free_mib=min_free)


def test_headroom_is_judged_on_the_burst_minimum_not_idle() -> None:
    slo = SLO(headroom_gib=1.0)
    idle = [headroom(2048.0, slo)]  # 2 GiB free at idle: passes
    judged = burst_verdicts(idle, _burst(512.0), slo)
    room = next(v for v in judged if v.name == FREE_MEMORY_VERDICT)
    assert room.measured == 0.5 and not room.ok
    assert next(v for v in judged if v.name == FAILED_VERDICT).ok
    assert not next(v for v in burst_verdicts(idle, _burst(2048.0, failed=1), slo) if v.name == FAILED_VERDICT).ok


def test_a_burst_on_a_real_server_records_its_minimum_and_is_judged_on_it(
        llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Two slots of 512 tokens, each filled to half with a 16-token reply: the record holds both free
    figures, per-slot prompt tokens the server counted, and the headroom verdict reads the burst minimum."""
    profile = HostProfile(name="cpu", memory_gib=2.0, burst=Burst(fill=0.5, reply_tokens=16),
                          workload=Workload(token_scale=1.0, request_timeout_s=60))
    cfg = CapacityConfig(profile="cpu", n=2, ctx=512, threads=2, cache_ram_mib=0)
    spec = LaunchSpec(config=cfg, profile=profile, log_dir=tmp_path, command=(str(llama_server_bin),),
                      model=tiny_model, boot_timeout_s=60, hold_s=0.2)
    handle = ServerHandle(spec, HostProbe(2048))
    try:
        handle.boot()
        handle.hold(0.3)
        slo = SLO(headroom_gib=0.5)
        record, verdicts = with_burst(handle, *ceiling_record(handle, "t", slo), slo)
    finally:
        handle.stop()
    mem, burst = record["memory"], record["burst"]
    assert mem["free_idle_mib"] == mem["free_mib"] and mem["free_under_burst_mib"] == burst["min_free_mib"]
    assert burst["failed"] == 0 and burst["completion_tokens"] == [16, 16] and burst["samples"] > 0
    assert len(burst["prompt_tokens"]) == 2 and all(
        0.9 * burst["target_prompt_tokens"] <= p <= burst["target_prompt_tokens"] for p in burst["prompt_tokens"])
    room = next(v for v in verdicts if v.name == FREE_MEMORY_VERDICT)
    assert room.measured == pytest.approx(burst["min_free_mib"] / 1024, abs=0.1 / 1024)  # recorded to 0.1 MiB
    typed = parse(record)
    assert typed.burst.min_free_mib == burst["min_free_mib"] and typed.to_dict() == record


def test_a_text_only_config_gets_no_image_and_the_record_says_so() -> None:
    """No server needed: on a config without a projector the roles lose their images before sending and
    the section counts the image turns that went as text (a stand-in handle: only ``config.mmproj`` is read)."""
    from types import SimpleNamespace

    from pytest_gpucap.vision import TEXT_ONLY_NOTE, for_server, section
    from pytest_gpucap.workload.client import RequestRecord

    handle = SimpleNamespace(config=SimpleNamespace(mmproj=False))
    roles = [Role("V", None, 10, 10, images_per_turn=1, image_every=2)]
    assert [r.images_per_turn for r in for_server(roles, handle)] == [0]  # type: ignore[arg-type]
    recs = [RequestRecord(agent=0, role="V", turn=t, scheduled=0.0) for t in range(5)]
    vis = section(handle, roles, recs)  # type: ignore[arg-type]
    assert vis is not None and vis.sent is False and vis.note == TEXT_ONLY_NOTE
    assert (vis.image_turns, vis.images, vis.image_tokens_per_image) == (3, 3, None)
    assert section(handle, [Role("T", None, 10, 10)], recs) is None  # type: ignore[arg-type]

"""Options resolve command line → environment → ini, for every option (the server commands included)."""

from __future__ import annotations

import pytest

from pytest_gpucap.options import _OPTIONS, resolve_settings


@pytest.mark.parametrize(("ini", "env", "field"), [
    ("gpucap_server_bin", "GPUCAP_LLAMA_SERVER", "server_bin"),
    ("gpucap_vllm", "GPUCAP_VLLM", "vllm"),
])
def test_environment_wins_over_ini_for_server_commands(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                      ini: str, env: str, field: str) -> None:
    pytester.makeini(f"[pytest]\n{ini} = /from/ini\n")
    monkeypatch.delenv(env, raising=False)
    assert getattr(resolve_settings(pytester.parseconfig()), field) == "/from/ini"
    monkeypatch.setenv(env, "/from/env")
    assert getattr(resolve_settings(pytester.parseconfig()), field) == "/from/env"
    flag = "--gpucap-" + ini.removeprefix("gpucap_").replace("_", "-")
    assert getattr(resolve_settings(pytester.parseconfig(f"{flag}=/from/cli")), field) == "/from/cli"


def test_every_value_option_has_an_environment_variable() -> None:
    assert [name for name, _ini, env, _help in _OPTIONS if not env] == []

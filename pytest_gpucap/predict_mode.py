"""``--gpucap-predict``: the selected configs' predicted fit, beside llama.cpp's own projection, and
nothing boots.

llama.cpp's figure comes from ``llama-fit-params`` (a dry run beside ``llama-server``) for each
llama.cpp config whose server and model can be resolved; a ``generated:`` model is generated for it
(once, in the model cache), a missing one leaves the column empty.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from . import prediction, terminal
from .backends.fit_params import project
from .pinning import VISIBLE_ENV, llama_args
from .resolve import Missing, Resolver


def run(session: pytest.Session, state: Any) -> bool:
    """Print the fit table (and why some configs could not be predicted); always True: nothing runs."""
    config = session.config
    selected = {item.callspec.params["gpucap_config"].id: item.callspec.params["gpucap_config"]
                for item in session.items if hasattr(item, "callspec") and "gpucap_config" in item.callspec.params}
    preds, missing = prediction.predict_matrix(state.matrix, state.settings.model, state.settings.mmproj,
                                               state.calibration)
    rows = [p for p in preds if p.config_id in selected]
    writer = config.get_terminal_writer()
    if rows:
        writer.line(terminal.fit_table(rows, projections(config, state, [selected[p.config_id] for p in rows])))
    else:
        writer.line("gpucap: no capacity configuration selected")
    for line in missing:
        if line.split(":", 1)[0] in selected:
            writer.line(line)
    return True


def projections(config: pytest.Config, state: Any, configs: list[Any]) -> dict[str, float | None]:
    """llama.cpp's projected total (MiB) per config id; None where it could not be made."""
    cache = getattr(config, "cache", None)
    cache_dir = Path(cache.mkdir("gpucap-models")) if cache else Path.home() / ".cache" / "pytest-gpucap"
    resolver = Resolver(state.settings, state.matrix, cache_dir, Path(os.devnull))
    out: dict[str, float | None] = {}
    for cfg in configs:
        out[cfg.id] = None
        if cfg.backend != "llamacpp" or state.settings.endpoint or cfg.endpoint:
            continue
        try:
            spec = resolver.spec(cfg)
        except Missing:
            continue
        if not spec.command or spec.model is None:
            continue
        env = {**os.environ, **dict(cfg.env)}
        if spec.visible_devices is not None:
            env[VISIBLE_ENV] = spec.visible_devices
        found = project(Path(spec.command[0]), cfg, spec.model,
                        llama_args(len(spec.gpus), cuda=spec.profile.device == "cuda"), env)
        out[cfg.id] = found.total_mib if found is not None else None
    return out

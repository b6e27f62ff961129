"""Resolve what one config needs before it boots: the server command, the model, the projector.

Everything here is a lookup, done once per session and backend where it can be; a missing part
raises ``Missing`` with what to pass, which the plugin turns into a skip. The backend says which
kind of model it loads (``Backend.model_format``) and whether it takes a projector, so nothing
here asks which backend it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from .backends import Backend, CommandLookup, LaunchSpec, backend_for
from .matrix import BUILTIN_MODELS, GENERATED_PREFIX, CapacityConfig, HostProfile, Matrix
from .options import Settings
from .pinning import VISIBLE_ENV, PinError, config_gpus, device_keys, map_gpus


class Missing(Exception):
    """A part the config needs is not on this machine; the message says what to pass."""


@dataclass
class Resolver:
    """Per-session lookups: commands per backend (found once), models and projectors per config."""

    settings: Settings
    matrix: Matrix
    cache_dir: Path
    log_dir: Path
    owner_token: str = ""
    progress: Callable[[str], None] | None = None
    lock_dir: Path | None = None  # where device locks live (shared by xdist workers); None: no locks
    worker_gpu: int | None = None  # this xdist worker's card under --gpucap-gpus (pinning.worker_gpu)
    commands: dict[str, CommandLookup] = field(default_factory=dict)

    def command(self, backend: Backend) -> CommandLookup:
        """The backend's command, looked up once per session (option, env, ini, then its own search)."""
        if backend.name not in self.commands:
            explicit = getattr(self.settings, backend.command_option) if backend.command_option else None
            self.commands[backend.name] = backend.find_command(explicit)
        return self.commands[backend.name]

    @property
    def server_version(self) -> str:
        """The llama-server build, when one was looked up (the session facts name it)."""
        found = self.commands.get("llamacpp")
        return found.version if found and found.found else ""

    def spec(self, cfg: CapacityConfig) -> LaunchSpec:
        """Resolve command, model, projector and limits for one config; raises ``Missing``."""
        profile = self.matrix.profile(cfg.profile)
        settings = self.settings
        gpus = config_gpus(cfg, profile, self.worker_gpu)
        try:
            mapped = map_gpus(gpus, os.environ.get(VISIBLE_ENV))
        except PinError as exc:
            raise Missing(f"{cfg.id}: {exc}") from None
        keys = device_keys(mapped, profile)
        spec = LaunchSpec(
            config=cfg, profile=profile, log_dir=settings.log_dir or self.log_dir,
            boot_timeout_s=settings.boot_timeout_s or profile.boot_timeout_s,
            hold_s=settings.hold_s if settings.hold_s is not None else profile.hold_s,
            owner_token=self.owner_token, preflight=settings.preflight,
            endpoint=settings.endpoint or cfg.endpoint, progress=self.progress,
            device_locks=(tuple(self.lock_dir / f"device-{key}.lock" for key in keys)
                          if self.lock_dir is not None and profile.exclusive else ()),
            device_keys=keys, gpus=gpus, visible_devices=",".join(mapped) if gpus else None,
        )
        backend = backend_for(cfg.backend)
        if spec.endpoint or backend.model_format is None:
            return spec
        found = self.command(backend)
        if not found.found:
            raise Missing(found.source)
        model = self.model_path(cfg, profile, backend.model_format, found.python)
        mmproj = self.mmproj_path(cfg, profile) if cfg.mmproj and backend.loads_mmproj else None
        return replace(spec, command=found.argv, binary_version=found.version, model=model, mmproj=mmproj)

    # ------------------------------------------------------------------ models

    def generated_table(self, cfg: CapacityConfig, profile: HostProfile) -> Mapping[str, Any] | None:
        """The shape table of a ``generated:NAME`` model reference, or None for a model file."""
        ref = self.settings.model or cfg.model or profile.model
        if ref is None or not ref.startswith(GENERATED_PREFIX):
            return None
        name = ref.removeprefix(GENERATED_PREFIX)
        return self.matrix.models.get(name) or BUILTIN_MODELS[name]

    def model_path(self, cfg: CapacityConfig, profile: HostProfile, model_format: str, python: str | None) -> Path:
        """The model a config runs: ``generated:NAME`` built in the backend's format, or a path
        (relative to the matrix file)."""
        ref = self.settings.model or cfg.model or profile.model
        if ref is None:
            raise Missing(f"profile {profile.name!r} names no model: pass --gpucap-model PATH or set model in the "
                          "matrix")
        table = self.generated_table(cfg, profile)
        if table is not None:
            return self._generate(cfg, table, model_format, python)
        path = Path(ref).expanduser()
        if not path.is_absolute() and self.matrix.path is not None:
            path = self.matrix.path.parent / path
        if not path.exists():
            what = "a GGUF file" if model_format == "gguf" else "a Hugging Face model directory"
            raise Missing(f"model {path} not found: pass --gpucap-model PATH ({what})")
        return path

    def _generate(self, cfg: CapacityConfig, table: Mapping[str, Any], model_format: str,
                  python: str | None) -> Path:
        if model_format == "gguf":
            from .modelgen import ModelShape, ensure_model

            return ensure_model(ModelShape.from_mapping(table), self.cache_dir)
        from .hfmodel import HfModelShape, ensure_hf_model

        try:
            return ensure_hf_model(HfModelShape.from_model_table(table), self.cache_dir / "hf", python=python)
        except RuntimeError as exc:
            raise Missing(f"{cfg.id}: cannot generate the model: {exc}") from None

    def mmproj_path(self, cfg: CapacityConfig, profile: HostProfile) -> Path:
        """The vision projector: the one passed, or a generated one sized for a generated model."""
        ref = self.settings.mmproj or profile.mmproj
        if ref is not None:
            path = Path(ref).expanduser()
            if not path.is_absolute() and self.matrix.path is not None and profile.mmproj == ref:
                path = self.matrix.path.parent / path
            if not path.is_file():
                raise Missing(f"{cfg.id}: vision projector {path} not found: pass --gpucap-mmproj PATH")
            return path
        table = self.generated_table(cfg, profile)
        if table is None:
            raise Missing(f"{cfg.id} loads a vision projector: pass --gpucap-mmproj PATH "
                          "(one is generated only next to a generated model)")
        from .mmprojgen import ProjectorShape, ensure_mmproj
        from .modelgen import ModelShape

        return ensure_mmproj(ProjectorShape.for_model(ModelShape.from_mapping(table)), self.cache_dir)

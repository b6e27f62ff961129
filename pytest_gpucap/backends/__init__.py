"""Inference servers: the managed-process core, one module per backend, and the launcher."""

from .handle import LaunchSpec, PreflightSkip, ServerHandle
from .process import ServerError

__all__ = ["LaunchSpec", "PreflightSkip", "ServerError", "ServerHandle"]

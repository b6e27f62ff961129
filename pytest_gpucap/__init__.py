"""pytest-gpucap: GPU capacity planning for self-hosted LLM inference as a gating pytest suite."""

__version__ = "0.1.0"

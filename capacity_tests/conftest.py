"""The capacity suite runs with the pytest-gpucap plugin (installed via its pytest11 entry point).

Matrix: capacity_tests/gpucap.toml (override with --gpucap-matrix).
"""

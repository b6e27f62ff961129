"""Predict a capacity configuration's memory before anything boots, and check it against the server.

The parts, each usable alone and each in its own module:

* :mod:`.facts`: the GGUF metadata that sizes memory (:func:`read_model_facts`) and ggml type sizes.
* :mod:`.kv`: the KV cache, exactly (:func:`predict_kv`), to the hundredth of a MiB llama-server prints.
* :mod:`.compute`: the compute buffer, estimated (:func:`estimate_compute_bytes`).
* :mod:`.weights`: the device's share of the weights and the bytes a decode step reads.
* :mod:`.calibration`: per-host corrections learned from measured runs (:func:`calibrate`) from
  :class:`CalibrationSample` objects, which the records layer builds (``record_calibration``).
* :mod:`.predict`: all of it added up (:func:`predict`), giving predicted used and free device memory
  and the study's headroom verdict, for one config or a whole matrix (:func:`predict_matrix`).
* :mod:`.roofline`: the bandwidth bound on aggregate decode tokens/s (:func:`decode_roofline_tps`).

The package sits below the servers, workloads, records and verdicts: it reads only the matrix
(configs, profiles, SLOs), the model generators and model files, so anything may call it before a
server exists. Text for the terminal (``--gpucap-predict``'s table) is in :mod:`pytest_gpucap.terminal`.
"""

from __future__ import annotations

from .calibration import (Calibration, CalibrationSample, ProfileCalibration, calibrate, load_calibration,
                          save_calibration)
from .compute import estimate_compute_bytes
from .facts import (ModelFacts, facts_from_shape, is_host_buffer, mmproj_bytes, printed_mib, quant_sizes,
                    read_model_facts, row_bytes)
from .kv import KvCachePrediction, KvLayout, kv_bytes_per_token, kv_layout, kv_problems, predict_kv, slot_ctx
from .predict import Prediction, facts_for_ref, predict, predict_for, predict_matrix, prediction_error
from .roofline import KNOWN_BANDWIDTH_GBPS, bandwidth_for, decode_roofline_tps, decode_step_bytes, efficiency

__all__ = [
    "KNOWN_BANDWIDTH_GBPS", "Calibration", "CalibrationSample", "KvCachePrediction", "KvLayout", "ModelFacts",
    "Prediction", "ProfileCalibration", "bandwidth_for", "calibrate", "decode_roofline_tps",
    "decode_step_bytes", "efficiency", "estimate_compute_bytes", "facts_for_ref", "facts_from_shape",
    "is_host_buffer", "kv_bytes_per_token", "kv_layout", "kv_problems", "load_calibration", "mmproj_bytes",
    "predict", "predict_for", "predict_kv", "predict_matrix", "prediction_error", "printed_mib", "quant_sizes",
    "read_model_facts", "row_bytes", "save_calibration", "slot_ctx",
]

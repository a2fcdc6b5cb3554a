"""NNCodec (MPEG-7 NNC reference coder, DeepCABAC) as a peer for tools/bench.py: encode and decode weights at given qps.

Runs with the NNCodec venv's python (``bash tools/install_nncodec.sh``; NNCodec needs numpy<2, dcz needs numpy 2),
never with dcz's. It imports only ``nncodec.nnc_core`` (numpy + the C++ extension): ``nncodec.nnc`` and
``nncodec.tensor`` import torch and friends.

    .cache/nncodec-venv/bin/python tools/nncodec_peer.py weights.npz < requests

``weights.npz`` holds float32 arrays (any keys, any shapes; a 0-d array is coded as shape (1,)). Each line on stdin
is a JSON request ``{"qp": -32, "out": "decoded.npz"}``; for each, the peer encodes every array into one NNC
bitstream at that qp (NNCodec's own defaults otherwise: qp_density 2, dependent quantization, parameter
optimisation; tensors of rank < 2 at ``nonweight_qp`` -75, i.e. near-lossless), decodes the bitstream bytes back,
writes the decoded arrays (same keys, shapes, float32) to ``out`` and prints one JSON line:
``{"qp", "bitstream_bytes", "encode_s", "decode_s", "peak_rss"}``. An empty line or end of input ends the peer.
Loading the weights once and serving several qps keeps the per-qp cost to the coding itself.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import numpy as np
from nncodec import nnc_core
from nncodec.nnc_core import nnr_model

#: NNCodec's defaults in nncodec.nnc.compression.compress (which we cannot import: it pulls torch).
QP_DENSITY = 2  # step = 2 ** (qp / 2**QP_DENSITY)
NONWEIGHT_QP = -75  # step for tensors of rank < 2 (biases, norms): 2**-18.75, near-lossless
CABAC_UNARY_LENGTH_MINUS1 = 10
USE_DQ = True  # dependent (trellis-coded) quantization
PARAM_OPT = True  # let the encoder pick the coding parameters per tensor
SCAN_ORDER = 0


def _enc_info() -> dict:
    return {
        "cabac_unary_length_minus1": CABAC_UNARY_LENGTH_MINUS1, "param_opt_flag": PARAM_OPT,
        "partial_data_counter": 0, "general_profile_idc": 1, "node_id_present_flag": 1, "device_id": 0,
        "mps_parent_signalling_enabled_flag": 0, "parent_node_id_present_flag": 0,
        "temporal_context_modeling_flag": 0, "row_skip_enabled_flag": 0, "pre_signalling": 0,
    }


def encode(params: dict[str, np.ndarray], qp: int) -> bytes:
    """One NNC bitstream holding every array of ``params`` (float32, rank >= 1) at ``qp``."""
    model = nnr_model.NNRModel(params)
    approx_data = nnc_core.approximator.init_approx_data(params, model.model_info, qp_density=QP_DENSITY,
                                                         scan_order=SCAN_ORDER)
    approx_info = nnc_core.approximator.ApproxInfo(
        approx_data, model.model_info, "uniform", 0, qp, False, not USE_DQ, CABAC_UNARY_LENGTH_MINUS1, 0,
        nonweight_qp=NONWEIGHT_QP, qp_per_tensor=None, int_quant_bw=False).approx_info
    enc_info = _enc_info()
    approx_enc = nnc_core.approximator.approx(approx_info, model.model_info, approx_data, enc_info)
    bitstream, _ = nnc_core.coder.encode(enc_info=enc_info, model_info=model.model_info, approx_data=approx_enc)
    return bytes(bitstream)


def decode(bitstream: bytes) -> dict[str, np.ndarray]:
    """The arrays of an NNC bitstream, reconstructed (float32)."""
    info = {
        "parameter_type": {}, "parameter_dimensions": {}, "parameter_index": {}, "block_identifier": {},
        "topology_storage_format": None, "topology_compression_format": None,
        "performance_maps": {"mps": {}, "lps": {}},
        "performance_map_flags": {k: {} for k in (
            "mps_sparsification_flag", "lps_sparsification_flag", "mps_pruning_flag", "lps_pruning_flag",
            "mps_unification_flag", "lps_unification_flag", "mps_decomposition_performance_map_flag",
            "lps_decomposition_performance_map_flag")},
    }
    data = nnc_core.coder.decode(bytearray(bitstream), info, hls_stats={}, oob_dict={})
    nnc_core.approximator.rec(data)
    data = nnc_core.approximator.recompose_params(info, data)
    return data["parameters"]


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main() -> int:
    with np.load(sys.argv[1]) as z:
        arrays = {k: np.asarray(z[k], dtype=np.float32) for k in z.files}
    shapes = {k: a.shape for k, a in arrays.items()}
    params = {k: a.reshape(1) if a.ndim == 0 else a for k, a in arrays.items()}
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        qp = int(req["qp"])
        with contextlib.redirect_stdout(sys.stderr):  # NNCodec prints notes; stdout carries only our JSON lines
            t0 = time.perf_counter()
            bitstream = encode(params, qp)
            t1 = time.perf_counter()
            decoded = decode(bitstream)
            t2 = time.perf_counter()
        missing = set(params) - set(decoded)
        if missing:
            raise SystemExit(f"qp {qp}: the bitstream decoded without {sorted(missing)[:5]}")
        np.savez(req["out"], **{k: np.asarray(decoded[k], dtype=np.float32).reshape(shapes[k]) for k in params})
        print(json.dumps({"qp": qp, "bitstream_bytes": len(bitstream), "encode_s": t1 - t0, "decode_s": t2 - t1,
                          "peak_rss": _peak_rss()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

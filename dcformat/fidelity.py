"""Output fidelity: run an original and a rebuilt ONNX model on the same inputs and measure how far apart they are.

The inputs are either real data (a ``.npz`` keyed by input name, see :func:`load_inputs`) or random tensors made from
the graph's declared inputs (:func:`random_inputs`). Random inputs are a weak check: they exercise every weight but not
the input distribution the model was trained on, so a small relative error on noise says little about accuracy on real
data, and models whose inputs carry meaning (a sample rate, token ids, a recurrent state) may need
``value_overrides`` / ``shape_overrides`` to run at all. Prefer real inputs where you have them.

Models run on onnxruntime's CPU provider. Only numpy, onnx and onnxruntime are used.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from .errors import InputError

__all__ = [
    "OutputFidelity",
    "run_each",
    "random_inputs",
    "load_inputs",
    "run",
    "compare",
    "check_models",
    "DEFAULT_DIM",
    "INT_HIGH",
]

DEFAULT_DIM = 32  # unknown non-batch dims: big enough for conv/pool stacks of stride 32, small enough to run fast
INT_HIGH = 10  # random integer inputs are drawn from [0, INT_HIGH): small and non-negative, valid as indices
ORT_THREADS = 2  # the machines have 2 cores; a fixed count also keeps reruns comparable
#: Worker threads do not spin while idle: on a 2-core machine shared with another job, spinning threads steal
#: the cores their own session needs (measured on the allocation's probe: ppocr-rec 2.0 s a run spinning, 1.5 s not).
ORT_ALLOW_SPINNING = "0"
ORT_LOG_SEVERITY = 4  # log only fatal errors: warnings are noise, errors reach the caller as InputError
PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialize a message larger than 2 GiB; bigger models run from a path
_TINY = float(np.finfo(np.float64).tiny)  # denominator floor for the relative L2 error of an all-zero reference

# onnxruntime's type strings for tensor inputs -> the numpy dtype a caller must feed.
_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class OutputFidelity:
    """How closely one output of a candidate model matches the reference model's.

    ``top1_agreement`` is set only where the output looks like class scores: a floating-point output of rank >= 2
    whose last axis has >= 2 entries (``[N, C]`` logits, ``[N, T, C]`` per-step scores). It is then the fraction of
    rows (all axes but the last) whose argmax agrees, and ``n_samples`` is the number of those rows; otherwise
    ``top1_agreement`` is None and ``n_samples`` is 0. The heuristic also fires on float outputs that are not scores
    (e.g. ``[N, 4]`` boxes); read it only where the output is a class-score tensor.

    Numeric and bool outputs are compared in float64; NaN anywhere gives NaN metrics. Non-numeric outputs (strings)
    only compare as identical (rel_l2 = max_abs = 0, cosine = 1) or not (inf, inf, 0).
    """

    name: str
    rel_l2: float  # ||ref - cand||_2 / max(||ref||_2, tiny)
    max_abs: float  # max |ref - cand|
    cosine: float  # <ref, cand> / (||ref|| ||cand||); 1.0 when both are all zero, 0.0 when only one is
    top1_agreement: float | None
    n_samples: int


def _load_proto(model: onnx.ModelProto | str | bytes | os.PathLike) -> onnx.ModelProto:
    """The ModelProto of ``model`` without its external data (only the graph's interface is needed)."""
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, (bytes, bytearray, memoryview)):
            return onnx.load_model_from_string(bytes(model))
        return onnx.load_model(os.fspath(model), load_external_data=False)
    except FileNotFoundError as e:
        raise InputError(f"model file {os.fspath(model)!r} does not exist") from e
    except Exception as e:  # protobuf's DecodeError and friends: the bytes are not an ONNX model
        raise InputError(f"cannot parse {_label(model)} as an ONNX model: {e}") from e


def _label(model: Any) -> str:
    if isinstance(model, onnx.ModelProto):
        return f"ModelProto {model.graph.name!r}" if model.graph.name else "ModelProto"
    if isinstance(model, (bytes, bytearray, memoryview)):
        return f"model bytes ({len(model)} B)"
    return f"model {os.fspath(model)!r}"


def random_inputs(
    model: onnx.ModelProto | str | bytes | os.PathLike,
    *,
    batch: int = 1,
    seed: int = 0,
    dim_overrides: Mapping[str, int] | None = None,
    shape_overrides: Mapping[str, Sequence[int]] | None = None,
    value_overrides: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Random feeds for every graph input that is not an initializer, from its declared element type and shape.

    Shapes: fixed dims are kept. A symbolic or unknown dim on axis 0 of an input of rank >= 2 is the batch and
    becomes ``batch``, and so does every other dim with the same ``dim_param`` name (``state [2, "batch", 128]``
    follows ``input ["batch", ...]``). Other symbolic or unknown dims (including axis 0 of a rank-1 input) become
    :data:`DEFAULT_DIM`. ``dim_overrides`` sets dims by their ``dim_param`` name; ``shape_overrides`` sets an
    input's whole shape (the way to size unnamed dims); ``value_overrides`` gives an input's value outright (cast to
    the declared type), e.g. ``{"sr": 16000}`` for silero-vad.

    Values: floats ~ U(0, 1) (like images scaled /255), integers uniform in [0, :data:`INT_HIGH`), bools fair coin.
    Inputs are drawn in graph order from one ``numpy.random.default_rng(seed)``.

    Raises:
        InputError: an input is not a tensor, has an element type or rank that cannot be made up (strings,
            no declared shape) and no override, or an override names no input of the graph.
    """
    if batch < 1:
        raise InputError(f"batch must be >= 1, got {batch}")
    proto = _load_proto(model)
    dim_overrides = dict(dim_overrides or {})
    shape_overrides = dict(shape_overrides or {})
    value_overrides = dict(value_overrides or {})
    graph = proto.graph
    inits = {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer}
    inputs = [v for v in graph.input if v.name not in inits]
    names = {v.name for v in inputs}
    for kind, over in (("shape_overrides", shape_overrides), ("value_overrides", value_overrides)):
        unknown = sorted(set(over) - names)
        if unknown:
            raise InputError(f"{kind} names {unknown}, which are not inputs of {_label(model)}; "
                             f"inputs: {sorted(names)}")

    # dim_params that appear on axis 0 of some input of rank >= 2 are batch dims everywhere.
    batch_params: set[str] = set()
    for v in inputs:
        tt = v.type.tensor_type
        if v.type.HasField("tensor_type") and tt.HasField("shape") and len(tt.shape.dim) >= 2:
            d0 = tt.shape.dim[0]
            if d0.HasField("dim_param"):
                batch_params.add(d0.dim_param)

    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for v in inputs:
        if not v.type.HasField("tensor_type"):
            if v.name in value_overrides:
                feeds[v.name] = value_overrides[v.name]
                continue
            kind = v.type.WhichOneof("value")
            raise InputError(f"input {v.name!r} is a {kind}, not a tensor: pass it in value_overrides")
        tt = v.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception as e:  # an undefined or unknown elem_type code
            raise InputError(f"input {v.name!r} has element type {tt.elem_type}, which numpy cannot hold") from e
        known = tt.elem_type in TensorProto.DataType.values()
        type_name = TensorProto.DataType.Name(tt.elem_type) if known else str(tt.elem_type)
        if v.name in value_overrides:
            try:
                feeds[v.name] = np.asarray(value_overrides[v.name], dtype=dtype)
            except (TypeError, ValueError) as e:
                raise InputError(f"value_overrides[{v.name!r}] cannot be cast to {type_name}: {e}") from e
            continue
        if v.name in shape_overrides:
            shape = tuple(int(s) for s in shape_overrides[v.name])
        elif not tt.HasField("shape"):
            raise InputError(f"input {v.name!r} declares no shape (not even a rank): pass it in shape_overrides")
        else:
            rank = len(tt.shape.dim)
            shape = tuple(_resolve_dim(d, axis, rank, batch, batch_params, dim_overrides)
                          for axis, d in enumerate(tt.shape.dim))
        if any(s < 0 for s in shape):
            raise InputError(f"input {v.name!r}: shape {shape} has a negative dim")
        feeds[v.name] = _random_array(rng, dtype, shape, v.name, type_name)
    return feeds


def _resolve_dim(d: onnx.TensorShapeProto.Dimension, axis: int, rank: int, batch: int, batch_params: set[str],
                 dim_overrides: Mapping[str, int]) -> int:
    if d.HasField("dim_value") and d.dim_value >= 0:
        return int(d.dim_value)
    if d.HasField("dim_param"):
        if d.dim_param in dim_overrides:
            return int(dim_overrides[d.dim_param])
        if d.dim_param in batch_params:
            return batch
    return batch if axis == 0 and rank >= 2 else DEFAULT_DIM


def _random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...], name: str,
                  type_name: str) -> np.ndarray:
    if dtype.kind == "f":
        return rng.random(shape, dtype=np.float64).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    raise InputError(f"input {name!r} has element type {type_name}: random_inputs cannot make these up; "
                     "pass it in value_overrides")


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read model inputs from a ``.npz`` file whose array names are the model's input names.

    Raises:
        InputError: the file is missing, is not an ``.npz`` archive, holds pickled objects, or holds no arrays.
    """
    p = os.fspath(path)
    try:
        loaded = np.load(p, allow_pickle=False)
    except FileNotFoundError as e:
        raise InputError(f"input file {p!r} does not exist") from e
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # not a numpy file, or a pickle we refuse
        raise InputError(f"cannot read {p!r} as an .npz of arrays keyed by input name: {e}") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(f"{p!r} is a single .npy array, not an .npz keyed by input name")
    try:
        with loaded as z:
            out = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # a member is damaged or holds pickled objects
        raise InputError(f"cannot read {p!r} as an .npz of arrays keyed by input name: {e}") from e
    if not out:
        raise InputError(f"{p!r} holds no arrays; expected one per model input, keyed by input name")
    return out


def _session(model: onnx.ModelProto | bytes | str | os.PathLike, tmpdir: list[str]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = ORT_THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = ORT_LOG_SEVERITY
    so.add_session_config_entry("session.intra_op.allow_spinning", ORT_ALLOW_SPINNING)
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() > PROTO_LIMIT:
            d = tempfile.mkdtemp(prefix="dcz-fidelity-")
            tmpdir.append(d)
            path = os.path.join(d, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data")
            source: Any = path
        else:
            source = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray, memoryview)):
        source = bytes(model)
    else:
        source = os.fspath(model)
        if not os.path.exists(source):
            raise InputError(f"model file {source!r} does not exist")
    try:
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types for every load failure
        raise InputError(f"onnxruntime cannot load {_label(model)}: {e}") from e


def _check_feeds(sess: Any, inputs: Mapping[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    """Validate the caller's feeds against the session's declared inputs; return them as arrays."""
    declared = {a.name: a for a in sess.get_inputs()}
    overridable = {a.name for a in sess.get_overridable_initializers()}
    missing = [n for n in declared if n not in inputs]
    if missing:
        raise InputError(f"{label} needs input(s) {missing}, which are missing; given: {sorted(inputs)}")
    extra = sorted(set(inputs) - set(declared) - overridable)
    if extra:
        raise InputError(f"{label} has no input(s) named {extra}; its inputs are {list(declared)}")
    feeds: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        arr = np.asarray(value)
        feeds[name] = arr
        arg = declared.get(name)
        if arg is None:
            continue
        want = _ORT_DTYPES.get(arg.type)
        if arg.type == "tensor(string)":
            if arr.dtype.kind not in "UO":
                raise InputError(f"input {name!r} of {label}: dtype {arr.dtype}, but the model declares strings")
        elif want is not None and arr.dtype != want:
            raise InputError(f"input {name!r} of {label}: dtype {arr.dtype}, but the model declares {want} "
                             f"({arg.type}); cast it")
        shape = arg.shape
        if shape is None or not isinstance(shape, list):
            continue
        if arr.ndim != len(shape):
            raise InputError(f"input {name!r} of {label}: shape {arr.shape} has rank {arr.ndim}, but the model "
                             f"declares rank {len(shape)} ({shape})")
        for axis, (got, dim) in enumerate(zip(arr.shape, shape)):
            if isinstance(dim, int) and dim >= 0 and got != dim:
                raise InputError(f"input {name!r} of {label}: shape {arr.shape} has {got} on axis {axis}, but the "
                                 f"model declares {dim} ({shape})")
    return feeds


def _as_array(value: Any, name: str) -> np.ndarray:
    """onnxruntime's value for one output as an array in its own memory: a sequence of maps becomes rows of values
    by sorted key.

    onnxruntime (1.31) returns a tensor output as a view of the memory of the session that computed it, and that
    view keeps the session's whole arena alive: on magika about 300 MB a run, so the allocator's memo of a few
    kilobytes of outputs per run grew a ``--target`` search past 17 GB. A copy frees it with the session."""
    if isinstance(value, np.ndarray):
        return value if value.flags.owndata else value.copy()
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            keys = sorted(value[0])
            if all(sorted(v) == keys for v in value):
                return np.array([[v[k] for k in keys] for v in value])
        elif value and all(isinstance(v, np.ndarray) for v in value):
            if all(v.shape == value[0].shape for v in value):
                return np.stack(value)
    if isinstance(value, dict):
        keys = sorted(value)
        return np.array([value[k] for k in keys])
    try:
        return np.asarray(value)
    except (TypeError, ValueError):  # ragged sequences
        out = np.empty(1, dtype=object)
        out[0] = value
        return out


def run(model: onnx.ModelProto | bytes | str | os.PathLike,
        inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` on onnxruntime's CPU provider and return every graph output by name.

    ``model`` may be a ModelProto, serialized bytes, or a path; models over 2 GiB must come as a path (or a
    ModelProto, which is then written to a temporary folder with external data). Non-tensor outputs are turned into
    arrays: a sequence of maps (e.g. class probabilities of an ai.onnx.ml classifier) becomes one row per element
    with the values in sorted-key order; a sequence of equal-shape tensors is stacked.

    Raises:
        InputError: onnxruntime cannot load the model; an input is missing, unknown, or has the wrong dtype, rank or
            fixed dim (the message names it); or onnxruntime fails while running.
    """
    if not isinstance(inputs, Mapping):
        raise InputError(f"inputs must be a mapping of input name to array, not {type(inputs).__name__}")
    return list(run_each(model, [inputs]))[0]


def run_each(model: onnx.ModelProto | bytes | str | os.PathLike,
             inputs: Sequence[Mapping[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """:func:`run` on each feed dict of ``inputs``, in one onnxruntime session; yields each run's outputs as it
    finishes (a caller that reduces them need not hold them all).

    One session, not one per feed dict: a session is built once (and before :func:`_as_array` copied the outputs,
    each session's memory, about 300 MB a run on magika, stayed alive as long as its outputs were held: 32
    sessions left the process at 9.6 GB). Raises as :func:`run` does."""
    for f in inputs:
        if not isinstance(f, Mapping):
            raise InputError(f"inputs must be a mapping of input name to array, not {type(f).__name__}")
    if isinstance(model, (bytes, bytearray, memoryview)) and len(model) > PROTO_LIMIT:
        raise InputError(f"{_label(model)} is over 2 GiB; onnxruntime can only load such a model from a path")
    tmpdir: list[str] = []
    label = _label(model)
    try:
        sess = _session(model, tmpdir)
        names = [o.name for o in sess.get_outputs()]
        for f in inputs:
            feeds = _check_feeds(sess, f, label)
            try:
                values = sess.run(names, feeds)
            except Exception as e:  # onnxruntime's Fail / InvalidArgument / RuntimeException
                raise InputError(f"onnxruntime failed to run {label} on inputs "
                                 f"{ {k: (str(v.dtype), v.shape) for k, v in feeds.items()} }: {e}") from e
            yield {n: _as_array(v, n) for n, v in zip(names, values)}
    finally:
        for d in tmpdir:
            _rmtree(d)


def _rmtree(d: str) -> None:
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _is_numeric(a: np.ndarray) -> bool:
    return a.dtype.kind in "biufc"


def _fidelity(name: str, ref: np.ndarray, cand: np.ndarray) -> OutputFidelity:
    if not (_is_numeric(ref) and _is_numeric(cand)):
        same = ref.shape == cand.shape and bool(np.array_equal(ref, cand))
        return OutputFidelity(name, 0.0 if same else math.inf, 0.0 if same else math.inf, 1.0 if same else 0.0,
                              None, 0)
    a = ref.astype(np.float64, copy=False).ravel()
    b = cand.astype(np.float64, copy=False).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(a == b, 0.0, a - b)  # equal infinities count as equal
        err = float(np.linalg.norm(diff))
        na = float(np.linalg.norm(a))
        nb = float(np.linalg.norm(b))
        rel = err / max(na, _TINY) if not (math.isinf(err) and math.isinf(na)) else math.nan
        max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
        if na == 0.0 and nb == 0.0:
            cos = 1.0 if not (np.isnan(a).any() or np.isnan(b).any()) else math.nan
        elif na == 0.0 or nb == 0.0:
            cos = 0.0
        else:
            cos = float(np.dot(a, b) / (na * nb))
    top1: float | None = None
    n = 0
    if ref.dtype.kind == "f" and ref.ndim >= 2 and ref.shape[-1] >= 2:
        n = int(np.prod(ref.shape[:-1]))
        if n > 0:
            top1 = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)))
    return OutputFidelity(name, rel, max_abs, cos, top1, n)


def compare(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> list[OutputFidelity]:
    """One :class:`OutputFidelity` per reference output, in the reference's order.

    Raises:
        InputError: the candidate lacks an output of the reference, or an output's shape differs (named).
    """
    out = []
    for name, ref in reference.items():
        if name not in candidate:
            raise InputError(f"candidate has no output {name!r}; it has {sorted(candidate)}")
        r = np.asarray(ref)
        c = np.asarray(candidate[name])
        if r.shape != c.shape:
            raise InputError(f"output {name!r}: reference shape {r.shape}, candidate shape {c.shape}")
        out.append(_fidelity(name, r, c))
    return out


def check_models(original: onnx.ModelProto | bytes | str | os.PathLike,
                 rebuilt: onnx.ModelProto | bytes | str | os.PathLike,
                 inputs: Mapping[str, np.ndarray] | None = None, *, seed: int = 0) -> list[OutputFidelity]:
    """Run both models on ``inputs`` (default: :func:`random_inputs` of ``original`` with ``seed``) and compare.

    Raises:
        InputError: as :func:`run` and :func:`compare`.
    """
    if inputs is None:
        inputs = random_inputs(original, seed=seed)
    return compare(run(original, inputs), run(rebuilt, inputs))

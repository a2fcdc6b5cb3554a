"""Stage 1: read an ONNX model and split it into a graph skeleton and its float weights.

:func:`load_model` reads a ``.onnx`` file (and its external data, never outside the model's folder).
:func:`extract_weights` finds every float tensor (FLOAT, FLOAT16, BFLOAT16, DOUBLE) held in graph
initializers, in ``Constant`` nodes, in the subgraphs of ``If`` / ``Loop`` / ``Scan`` (at any depth), in
training-info graphs and in model-local functions. Each one becomes a :class:`Weight`; in the model it is
replaced by a *slot*: a TensorProto with the same name, dims, data type, doc string and metadata but no
data, marked as::

    data_location = EXTERNAL
    external_data = [("location", "dcz:"), ("dcz_tensor", <weight name>),
                     ("dcz_field", <field that held the data>), ("dcz_location", "set" | "unset")]

``dcz_field`` is ``raw_data``, the dtype's typed field (``float_data``, ``double_data``, ``int32_data``)
or ``none`` (a tensor with no elements and no data field); ``dcz_location`` says whether the original
tensor had ``data_location`` explicitly set. With these, :func:`dcformat.onnx_rebuild.rebuild` restores
the tensor field for field, so that extract -> rebuild with unchanged arrays gives a model whose
``SerializeToString()`` equals the original's. The serialized skeleton is the *graph blob*.

Every other tensor (int64 shapes, int8, strings, sparse tensors, tensors in attributes of nodes other
than ``Constant`` such as ``ConstantOfShape.value``) stays inside the graph untouched.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

from dcformat.errors import InputError

__all__ = [
    "Weight",
    "load_model",
    "load_external_data",
    "extract_weights",
    "iter_all_tensors",
    "FLOAT_DTYPES",
    "MARKER_LOCATION",
    "MAX_MODEL_FILE_BYTES",
]

#: protobuf cannot parse a message of 2 GiB or more; a bigger .onnx file cannot be a valid model.
MAX_MODEL_FILE_BYTES = 2**31 - 1
#: Length of a chain of pass-through ops (Cast, Transpose, ...) followed to classify a weight; real
#: exports have 1-3, and the bound keeps a hostile cyclic graph from looping.
MAX_PASS_THROUGH_DEPTH = 16

#: ``external_data["location"]`` value that marks a dcz slot. ``:`` cannot start a real relative path
#: on any platform ONNX runs on, so a genuine external-data reference is never mistaken for a slot.
MARKER_LOCATION = "dcz:"
MARKER_KEY_NAME = "dcz_tensor"
MARKER_KEY_FIELD = "dcz_field"
MARKER_KEY_LOCATION = "dcz_location"
#: ``dcz_field`` value for a tensor with no elements whose original had no data field at all.
FIELD_NONE = "none"

#: ONNX float element types that are extracted, with the numpy dtype of :attr:`Weight.array`
#: (little-endian; BFLOAT16 as its uint16 bit patterns) and the typed field that may hold the data.
FLOAT_DTYPES: dict[int, tuple[np.dtype, str]] = {
    TensorProto.FLOAT: (np.dtype("<f4"), "float_data"),
    TensorProto.FLOAT16: (np.dtype("<f2"), "int32_data"),
    TensorProto.BFLOAT16: (np.dtype("<u2"), "int32_data"),
    TensorProto.DOUBLE: (np.dtype("<f8"), "double_data"),
}

#: Every TensorProto field that can hold element data.
DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")

#: Bits per element of packed sub-byte types (their raw data is ceil(n * bits / 8) bytes).
_SUB_BYTE_BITS = {
    getattr(TensorProto, n): b
    for n, b in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(TensorProto, n)
}

_KIND_BY_OP = {
    "Conv": "conv", "ConvTranspose": "conv",
    "Gemm": "fc", "MatMul": "fc",
    "LSTM": "rnn", "GRU": "rnn", "RNN": "rnn",
    "BatchNormalization": "norm", "LayerNormalization": "norm", "InstanceNormalization": "norm",
    "GroupNormalization": "norm", "RMSNormalization": "norm",
}
#: When consumers disagree, the first kind in this order wins.
_KIND_PRIORITY = ("conv", "fc", "rnn", "embedding", "norm", "other")
#: Ops whose output carries the same weights in another form (looked through when classifying; their
#: data input only, and every input of ``Concat``, which reorders LSTM gates in PyTorch exports).
_PASS_THROUGH = frozenset({"Cast", "CastLike", "Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze",
                           "Flatten", "DequantizeLinear", "Slice", "Split"})
#: A bias added to the output of one of these ops (``MatMul`` then ``Add``, as PaddleOCR and tf2onnx
#: export dense layers) gets that op's kind.
_BIAS_PRODUCERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


@dataclass(frozen=True)
class Weight:
    """One float tensor taken out of the model.

    Attributes:
        name: unique key of the weight (initializer name, or a Constant node's output name), suffixed with
            ``#1``, ``#2``... when the same name occurs again in another scope.
        array: the values, read-only, shape = the tensor's dims; float16/float32/float64 as themselves,
            BFLOAT16 as uint16 bit patterns.
        onnx_dtype: ``onnx.TensorProto`` data type code.
        kind: 'conv' | 'fc' | 'rnn' | 'embedding' | 'norm' | 'other', from the op that consumes it.
        consumers: op types of the nodes that consume the tensor directly.
        origin: 'initializer' | 'constant' (in the main graph), 'subgraph' (inside If/Loop/Scan bodies or
            training graphs), or 'function' (inside a model-local function).
    """

    name: str
    array: np.ndarray
    onnx_dtype: int
    kind: str
    consumers: tuple[str, ...]
    origin: str = "initializer"


# --------------------------------------------------------------------------------------------------
# Walking the model


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    for t in graph.initializer:
        yield t
    for st in graph.sparse_initializer:
        yield st.values
        yield st.indices
    yield from _iter_nodes_tensors(graph.node)


def _iter_nodes_tensors(nodes) -> Iterator[TensorProto]:
    for node in nodes:
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR:
                yield a.t
            elif a.type == AttributeProto.TENSORS:
                yield from a.tensors
            elif a.type == AttributeProto.SPARSE_TENSOR:
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
            elif a.type == AttributeProto.SPARSE_TENSORS:
                for st in a.sparse_tensors:
                    yield st.values
                    yield st.indices
            elif a.type == AttributeProto.GRAPH:
                yield from _iter_graph_tensors(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _iter_graph_tensors(g)


def iter_all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto stored anywhere in ``model`` (graphs at any depth, attributes, functions)."""
    yield from _iter_graph_tensors(model.graph)
    for ti in model.training_info:
        yield from _iter_graph_tensors(ti.initialization)
        yield from _iter_graph_tensors(ti.algorithm)
    for f in model.functions:
        yield from _iter_nodes_tensors(f.node)


class _Slot(NamedTuple):
    """A float tensor candidate: where it is, its base name, and which consumer scope it belongs to."""

    tensor: TensorProto
    base_name: str
    origin: str
    scope: int


def _is_constant_node(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def _iter_graph_slots(graph: onnx.GraphProto, origin: str, scope: int) -> Iterator[_Slot]:
    for t in graph.initializer:
        yield _Slot(t, t.name, "initializer" if origin == "graph" else origin, scope)
    yield from _iter_node_slots(graph.node, origin, scope)


def _iter_node_slots(nodes, origin: str, scope: int) -> Iterator[_Slot]:
    for node in nodes:
        for a in node.attribute:
            if (a.name == "value" and a.type == AttributeProto.TENSOR and not a.ref_attr_name
                    and _is_constant_node(node)):
                base = node.output[0] if node.output and node.output[0] else (node.name or "constant")
                yield _Slot(a.t, base, "constant" if origin == "graph" else origin, scope)
            elif a.type == AttributeProto.GRAPH:
                yield from _iter_graph_slots(a.g, "subgraph" if origin == "graph" else origin, scope)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _iter_graph_slots(g, "subgraph" if origin == "graph" else origin, scope)


def _iter_slots(model: onnx.ModelProto) -> Iterator[_Slot]:
    """Candidate weight tensors in a fixed order: main graph (initializers, then nodes; subgraphs in node
    order), training graphs, then functions. Scope 0 is the main graph; function i is scope i + 1."""
    yield from _iter_graph_slots(model.graph, "graph", 0)
    for ti in model.training_info:
        yield from _iter_graph_slots(ti.initialization, "subgraph", 0)
        yield from _iter_graph_slots(ti.algorithm, "subgraph", 0)
    for i, f in enumerate(model.functions):
        yield from _iter_node_slots(f.node, "function", i + 1)


# --------------------------------------------------------------------------------------------------
# Classifying weights by their consumers


def _collect_nodes(nodes, out: list[onnx.NodeProto]) -> None:
    for node in nodes:
        out.append(node)
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                _collect_nodes(a.g.node, out)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    _collect_nodes(g.node, out)


class _Scope(NamedTuple):
    """Consumers and producers of every tensor name in one naming scope (a graph with its subgraphs)."""

    consumers: dict[str, list[tuple[str, int, onnx.NodeProto]]]  # name -> [(op_type, input index, node)]
    producers: dict[str, str]  # output name -> op_type


def _scope(node_lists) -> _Scope:
    """The consumer / producer maps over the given node lists and all their subgraphs.

    Subgraphs share the maps with their parent so that outer-scope references count as consumers.
    """
    flat: list[onnx.NodeProto] = []
    for nodes in node_lists:
        _collect_nodes(nodes, flat)
    cmap: dict[str, list[tuple[str, int, onnx.NodeProto]]] = {}
    pmap: dict[str, str] = {}
    for node in flat:
        for i, name in enumerate(node.input):
            if name:
                cmap.setdefault(name, []).append((node.op_type, i, node))
        for name in node.output:
            pmap.setdefault(name, node.op_type)
    return _Scope(cmap, pmap)


def _classify(name: str, scope: _Scope) -> tuple[str, tuple[str, ...]]:
    """(kind, direct consumer op types) of the tensor called ``name``."""
    cmap = scope.consumers
    direct = cmap.get(name, [])
    consumers = tuple(dict.fromkeys(op for op, _, _ in direct))
    kinds: set[str] = set()
    seen: set[str] = set()
    frontier = [(name, 0)]
    while frontier:
        cur, depth = frontier.pop()
        if cur in seen:
            continue
        seen.add(cur)
        for op, idx, node in cmap.get(cur, []):
            if op in _KIND_BY_OP:
                kinds.add(_KIND_BY_OP[op])
            elif op == "Gather" and idx == 0:
                kinds.add("embedding")
            elif (op in _PASS_THROUGH and idx == 0 or op == "Concat") and depth < MAX_PASS_THROUGH_DEPTH:
                frontier.extend((out, depth + 1) for out in node.output if out)
            elif op == "Add" and len(node.input) == 2:
                producer = scope.producers.get(node.input[1 - idx])
                if producer in _BIAS_PRODUCERS:
                    kinds.add(_KIND_BY_OP[producer])
    kind = next((k for k in _KIND_PRIORITY if k in kinds), "other")
    return kind, consumers


# --------------------------------------------------------------------------------------------------
# Reading tensor data exactly


def _element_count(t: TensorProto, label: str) -> int:
    n = 1
    for d in t.dims:
        if d < 0:
            raise InputError(f"tensor {label} has a negative dimension {d} in dims {list(t.dims)}")
        n *= int(d)
    return n


def _data_fields_present(t: TensorProto) -> list[str]:
    present = []
    for f in DATA_FIELDS:
        if f == "raw_data":
            if t.HasField("raw_data"):
                present.append(f)
        elif len(getattr(t, f)):
            present.append(f)
    return present


def _packed_field_array(t: TensorProto, field: str, n: int, dtype: np.dtype) -> np.ndarray:
    """The values of a packed fixed-width field (float_data, double_data) with their exact bits.

    Going through Python floats would turn signalling NaNs into quiet ones, so the field is serialized
    alone (a tag, a length, then the little-endian values) and read back as bytes.
    """
    alone = TensorProto()
    alone.CopyFrom(t)
    for f, _ in alone.ListFields():
        if f.name != field:
            alone.ClearField(f.name)
    wire = alone.SerializeToString()
    payload = n * dtype.itemsize
    if len(wire) < payload or wire[0] != (TensorProto.DESCRIPTOR.fields_by_name[field].number << 3 | 2):
        raise InputError(f"tensor {t.name!r}: {field} does not serialize as one packed field")  # pragma: no cover
    return np.frombuffer(wire, dtype=dtype, count=n, offset=len(wire) - payload)


def _read_float_tensor(t: TensorProto, label: str) -> tuple[np.ndarray, str]:
    """The tensor's values as a read-only little-endian array, and the field they came from."""
    dtype, typed_field = FLOAT_DTYPES[t.data_type]
    n = _element_count(t, label)
    shape = tuple(int(d) for d in t.dims)
    present = _data_fields_present(t)
    if len(present) > 1:
        raise InputError(f"tensor {label} holds data in several fields at once: {', '.join(present)}")
    if not present:
        if n != 0:
            raise InputError(f"tensor {label} has dims {list(shape)} ({n} elements) but no data")
        arr = np.zeros(shape, dtype=dtype)
        field = FIELD_NONE
    elif present[0] == "raw_data":
        raw = t.raw_data
        if len(raw) != n * dtype.itemsize:
            raise InputError(f"tensor {label}: raw_data is {len(raw)} bytes, dims {list(shape)} of "
                             f"{onnx.helper.tensor_dtype_to_string(t.data_type)} need {n * dtype.itemsize}")
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
        field = "raw_data"
    elif present[0] == typed_field:
        values = getattr(t, typed_field)
        if len(values) != n:
            raise InputError(f"tensor {label}: {typed_field} has {len(values)} values, dims {list(shape)} "
                             f"need {n}")
        if typed_field == "int32_data":  # FLOAT16 / BFLOAT16: one uint16 bit pattern per int32
            bits = np.array(values, dtype=np.int64)
            if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF):
                raise InputError(f"tensor {label}: int32_data holds values outside the 16-bit range "
                                 f"[{int(bits.min())}, {int(bits.max())}]")
            arr = bits.astype("<u2").view(dtype).reshape(shape)
        else:
            arr = _packed_field_array(t, typed_field, n, dtype).reshape(shape)
        field = typed_field
    else:
        raise InputError(f"tensor {label} of type {onnx.helper.tensor_dtype_to_string(t.data_type)} keeps its "
                         f"data in {present[0]}, which that type does not use")
    arr.flags.writeable = False
    return arr, field


# --------------------------------------------------------------------------------------------------
# Public API


def extract_weights(model: onnx.ModelProto) -> tuple[bytes, list[Weight]]:
    """Take every float tensor out of ``model``; return (graph blob, weights in traversal order).

    The model is modified in place: each extracted tensor becomes an empty marked slot, so the model
    itself becomes the skeleton (this keeps at most two copies of the weights alive: the arrays and the
    protobuf's own buffer until the caller drops the model). Pass a copy to keep the original.

    Raises:
        InputError: a tensor's data is malformed (size not matching its dims, several data fields,
            fp16 bits out of range), or a tensor still refers to external data (load the model with
            ``load_external=True``: a .dcz file holds everything needed to rebuild the model).
    """
    for t in iter_all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            raise InputError(f"tensor {t.name!r} still keeps its data in an external file; load the model with "
                             f"load_model(path, load_external=True) before extracting weights")
    slots = [s for s in _iter_slots(model) if s.tensor.data_type in FLOAT_DTYPES]
    # Training graphs consume main-graph weights by name, so they share scope 0.
    scopes = {0: _scope([model.graph.node]
                        + [g.node for ti in model.training_info for g in (ti.initialization, ti.algorithm)])}
    for i, f in enumerate(model.functions):
        scopes[i + 1] = _scope([f.node])

    used: set[str] = set()
    weights: list[Weight] = []
    fields: list[str] = []
    for slot in slots:  # read and check everything first: on error the model is left unchanged
        name = slot.base_name or "tensor"
        if name in used:
            k = 1
            while f"{name}#{k}" in used:
                k += 1
            name = f"{name}#{k}"
        used.add(name)
        arr, field = _read_float_tensor(slot.tensor, repr(name))
        kind, consumers = _classify(slot.base_name, scopes[slot.scope])
        weights.append(Weight(name, arr, int(slot.tensor.data_type), kind, consumers, slot.origin))
        fields.append(field)
    for slot, w, field in zip(slots, weights, fields):
        t = slot.tensor
        location_state = "set" if t.HasField("data_location") else "unset"
        if field != FIELD_NONE:
            t.ClearField(field)
        t.data_location = TensorProto.EXTERNAL
        entries = (("location", MARKER_LOCATION), (MARKER_KEY_NAME, w.name), (MARKER_KEY_FIELD, field),
                   (MARKER_KEY_LOCATION, location_state))
        for key, value in entries:
            e = t.external_data.add()
            e.key = key
            e.value = value
    return model.SerializeToString(), weights


_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def _external_entries(t: TensorProto) -> dict[str, str]:
    entries: dict[str, str] = {}
    for e in t.external_data:
        if e.key in entries:
            raise InputError(f"tensor {t.name!r}: external_data key {e.key!r} appears twice")
        entries[e.key] = e.value
    return entries


def _parse_nonneg(t: TensorProto, key: str, value: str) -> int:
    if not value.isdigit():
        raise InputError(f"tensor {t.name!r}: external_data {key} {value!r} is not a non-negative integer")
    return int(value)


def _expected_nbytes(t: TensorProto) -> int | None:
    """Bytes the tensor's raw data must have, or None for types without a fixed size (strings)."""
    n = _element_count(t, repr(t.name))
    if t.data_type in _SUB_BYTE_BITS:
        return math.ceil(n * _SUB_BYTE_BITS[t.data_type] / 8)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    if t.data_type == TensorProto.STRING:
        return None
    return n * itemsize


def _resolve_location(t: TensorProto, location: str, base_dir: str) -> str:
    """Real path of an external data file, refusing anything that is not inside ``base_dir``."""
    label = f"tensor {t.name!r}: external data location {location!r}"
    if not location:
        raise InputError(f"tensor {t.name!r}: external data has no location")
    if "\x00" in location:
        raise InputError(f"{label} contains a NUL byte")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or _DRIVE_RE.match(location):
        raise InputError(f"{label} is an absolute path; only paths inside the model's folder {base_dir!r} "
                         f"are allowed")
    if ".." in re.split(r"[\\/]", location):
        raise InputError(f"{label} goes up with '..'; only paths inside the model's folder {base_dir!r} "
                         f"are allowed")
    base_real = os.path.realpath(base_dir)
    target = os.path.realpath(os.path.join(base_real, location))
    if os.path.commonpath([base_real, target]) != base_real or target == base_real:
        raise InputError(f"{label} resolves to {target!r}, outside the model's folder {base_real!r} "
                         f"(a symbolic link?)")
    if not os.path.exists(target):
        raise InputError(f"{label}: file {target!r} not found")
    if not os.path.isfile(target):
        raise InputError(f"{label}: {target!r} is not a regular file")
    return target


def _load_external_data(model: onnx.ModelProto, base_dir: str) -> None:
    """Read every external tensor's bytes into raw_data (checked, never outside ``base_dir``)."""
    handles: dict[str, object] = {}
    try:
        for t in iter_all_tensors(model):
            if t.data_location != TensorProto.EXTERNAL:
                continue
            entries = _external_entries(t)
            target = _resolve_location(t, entries.get("location", ""), base_dir)
            offset = _parse_nonneg(t, "offset", entries.get("offset", "0"))
            file_size = os.path.getsize(target)
            if "length" in entries:
                length = _parse_nonneg(t, "length", entries["length"])
            else:
                length = max(file_size - offset, 0)
            if offset + length > file_size:
                raise InputError(f"tensor {t.name!r}: external data {target!r} is {file_size} bytes, shorter than "
                                 f"the declared offset {offset} + length {length} = {offset + length}")
            expected = _expected_nbytes(t)
            if expected is not None and length != expected:
                raise InputError(f"tensor {t.name!r}: external data length {length} bytes in {target!r}, dims "
                                 f"{list(t.dims)} of {onnx.helper.tensor_dtype_to_string(t.data_type)} need "
                                 f"{expected}")
            f = handles.get(target)
            if f is None:
                f = handles[target] = open(target, "rb")
            f.seek(offset)
            data = f.read(length)
            if len(data) != length:
                raise InputError(f"tensor {t.name!r}: read {len(data)} of {length} bytes at offset {offset} "
                                 f"from {target!r} (file changed while reading?)")
            t.raw_data = data
            del t.external_data[:]
            t.ClearField("data_location")
    finally:
        for f in handles.values():
            f.close()


def load_model(path: str | os.PathLike, *, load_external: bool = True) -> onnx.ModelProto:
    """Read an ONNX model file.

    With ``load_external`` (the default) tensors stored in external data files are read into the model
    (their ``external_data`` entries and ``data_location`` are cleared). External files must lie inside
    the model's folder: absolute locations, ``..`` and symbolic links leading outside are refused
    before anything is opened.

    Raises:
        InputError: the file is missing, empty, too large, not an ONNX ModelProto, or its external data
            is missing, too short, malformed or outside the model's folder. Messages name the tensor and
            the path.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputError(f"model file {p!r} not found")
    if not os.path.isfile(p):
        raise InputError(f"model path {p!r} is not a regular file")
    size = os.path.getsize(p)
    if size == 0:
        raise InputError(f"model file {p!r} is empty")
    if size > MAX_MODEL_FILE_BYTES:
        raise InputError(f"model file {p!r} is {size} bytes; a protobuf model file cannot exceed "
                         f"{MAX_MODEL_FILE_BYTES} bytes (large weights belong in external data)")
    with open(p, "rb") as f:
        data = f.read()
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, or RuntimeError from some backends
        raise InputError(f"{p!r} is not an ONNX model (protobuf parse failed: {exc})") from None
    del data
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise InputError(f"{p!r} is not an ONNX model (ir_version {model.ir_version}, "
                         f"{'has' if model.HasField('graph') else 'no'} graph)")
    if load_external:
        load_external_data(model, p)
    return model


def load_external_data(model: onnx.ModelProto, model_path: str | os.PathLike) -> None:
    """Read the external data of a model loaded with ``load_external=False`` (same checks as load_model)."""
    _load_external_data(model, os.path.dirname(os.path.abspath(os.fspath(model_path))))

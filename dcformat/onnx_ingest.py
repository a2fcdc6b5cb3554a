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
from dataclasses import field as dc_field
from typing import NamedTuple

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

from dcformat.errors import InputError

__all__ = [
    "Weight",
    "WeightRef",
    "ScannedModel",
    "scan_model",
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


class _Span(NamedTuple):
    """Where a tensor's raw bytes lie in a file (the model file itself, or an external data file)."""

    path: str
    offset: int
    length: int
    external: bool  # True: an external data file; False: the model file's own raw_data


@dataclass(frozen=True)
class WeightRef:
    """One float tensor of a model, its values read on demand by :meth:`load`.

    Attributes as :class:`Weight`; ``shape`` instead of an array. ``source`` is the array itself for
    tensors kept inline in a small field, or where its bytes lie in a file.
    """

    name: str
    shape: tuple[int, ...]
    onnx_dtype: int
    kind: str
    consumers: tuple[str, ...]
    origin: str
    source: "np.ndarray | _Span" = dc_field(repr=False)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * FLOAT_DTYPES[self.onnx_dtype][0].itemsize

    def load(self) -> np.ndarray:
        """The values, read-only, as :attr:`Weight.array` would hold them (one read of the file)."""
        if isinstance(self.source, np.ndarray):
            return self.source
        return _read_span(self.source, FLOAT_DTYPES[self.onnx_dtype][0], self.shape, repr(self.name))


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
        yield from _iter_attributes_tensors(node.attribute)


def _iter_attributes_tensors(attributes) -> Iterator[TensorProto]:
    # Every populated field, whatever the attribute's declared ``type``: onnx.load_external_data follows
    # ``t`` and ``tensors`` of an attribute that claims to be an INT, so the checks must see them too.
    for a in attributes:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.HasField("sparse_tensor"):
            yield a.sparse_tensor.values
            yield a.sparse_tensor.indices
        for st in a.sparse_tensors:
            yield st.values
            yield st.indices
        if a.HasField("g"):
            yield from _iter_graph_tensors(a.g)
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
        yield from _iter_attributes_tensors(f.attribute_proto)  # default values of the function's attributes


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
            else:  # subgraphs by their fields, not the declared type (the same graphs iter_all_tensors visits)
                if a.HasField("g"):
                    yield from _iter_graph_slots(a.g, "subgraph" if origin == "graph" else origin, scope)
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
            if a.HasField("g"):
                _collect_nodes(a.g.node, out)
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
    :func:`scan_model` does the same from a file without holding the weights in memory.

    Raises:
        InputError: a tensor's data is malformed (size not matching its dims, several data fields,
            fp16 bits out of range), or a tensor still refers to external data (load the model with
            ``load_external=True``: a .dcz file holds everything needed to rebuild the model).
    """
    for t in iter_all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            raise InputError(f"tensor {t.name!r} still keeps its data in an external file; load the model with "
                             f"load_model(path, load_external=True) before extracting weights")
    blob, refs = _take_weights(model, {})
    return blob, [Weight(r.name, r.source, r.onnx_dtype, r.kind, r.consumers, r.origin) for r in refs]


def _take_weights(model: onnx.ModelProto, spans: dict[int, "_Span"]) -> tuple[bytes, list["WeightRef"]]:
    """Mark every float slot of ``model`` and serialize the skeleton. A slot whose tensor is in ``spans``
    (by ``id``; its data is in a file) is read from there on demand; the others are read now."""
    slots = [s for s in _iter_slots(model) if s.tensor.data_type in FLOAT_DTYPES]
    # Training graphs consume main-graph weights by name, so they share scope 0.
    scopes = {0: _scope([model.graph.node]
                        + [g.node for ti in model.training_info for g in (ti.initialization, ti.algorithm)])}
    for i, f in enumerate(model.functions):
        scopes[i + 1] = _scope([f.node])

    used: set[str] = set()
    weights: list[WeightRef] = []
    fields: list[str] = []
    for slot in slots:  # read and check everything first: on error the model is left unchanged
        t = slot.tensor
        name = slot.base_name or "tensor"
        if name in used:
            k = 1
            while f"{name}#{k}" in used:
                k += 1
            name = f"{name}#{k}"
        used.add(name)
        if len(t.external_data) and id(t) not in spans:
            # A slot's markers go into external_data: entries already there (ignored by onnx and onnxruntime
            # while data_location is not EXTERNAL) would make a slot that cannot be read back.
            raise InputError(f"tensor {name!r} has {len(t.external_data)} external_data entries but keeps its data "
                             f"inline (data_location {TensorProto.DataLocation.Name(t.data_location)}); remove "
                             f"the stray entries")
        span = spans.get(id(t))
        if span is not None:
            source: np.ndarray | _Span = _check_span(t, span, repr(name))
            field = "raw_data"
        else:
            source, field = _read_float_tensor(t, repr(name))
        kind, consumers = _classify(slot.base_name, scopes[slot.scope])
        shape = tuple(int(d) for d in t.dims)
        weights.append(WeightRef(name, shape, int(t.data_type), kind, consumers, slot.origin, source))
        fields.append(field)
    for slot, w, field in zip(slots, weights, fields):
        t = slot.tensor
        span = spans.get(id(t))
        # A tensor read from an external file is restored as if its data had always been inline.
        location_state = "unset" if span is not None and span.external or not t.HasField("data_location") else "set"
        if field != FIELD_NONE:
            t.ClearField(field)
        del t.external_data[:]
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


def _external_span(t: TensorProto, base_dir: str) -> _Span:
    """Where an external tensor's bytes lie, after every check (inside ``base_dir``, long enough)."""
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
    return _Span(target, offset, length, True)


def _read_bytes(span: _Span, label: str, out: np.ndarray | None = None) -> bytes | np.ndarray:
    """The bytes of ``span`` (into ``out``, a C-contiguous array of exactly that size, if given)."""
    with open(span.path, "rb") as f:
        f.seek(span.offset)
        if out is None:
            data = f.read(span.length)
            got = len(data)
        else:
            data = out
            got = f.readinto(memoryview(out).cast("B")) if span.length else 0
    if got != span.length:
        raise InputError(f"tensor {label}: read {got} of {span.length} bytes at offset {span.offset} "
                         f"from {span.path!r} (file changed while reading?)")
    return data


def _read_span(span: _Span, dtype: np.dtype, shape: tuple[int, ...], label: str) -> np.ndarray:
    arr = np.empty(shape, dtype=dtype)
    if arr.nbytes != span.length:
        raise InputError(f"tensor {label}: {span.length} bytes in {span.path!r}, dims {list(shape)} of {dtype} "
                         f"need {arr.nbytes}")
    _read_bytes(span, label, arr.reshape(-1))
    arr.flags.writeable = False
    return arr


def _check_span(t: TensorProto, span: _Span, label: str) -> _Span:
    """A float slot whose raw data lies in a file: the same checks as :func:`_read_float_tensor`."""
    dtype, _ = FLOAT_DTYPES[t.data_type]
    n = _element_count(t, label)
    present = [f for f in _data_fields_present(t) if f != "raw_data"]
    if present:
        raise InputError(f"tensor {label} holds data in several fields at once: "
                         f"{', '.join(['raw_data'] + present)}")
    if span.length != n * dtype.itemsize:
        raise InputError(f"tensor {label}: raw_data is {span.length} bytes, dims {list(t.dims)} of "
                         f"{onnx.helper.tensor_dtype_to_string(t.data_type)} need {n * dtype.itemsize}")
    return span


def _load_external_data(model: onnx.ModelProto, base_dir: str) -> None:
    """Read every external tensor's bytes into raw_data (checked, never outside ``base_dir``)."""
    externals = [t for t in iter_all_tensors(model) if t.data_location == TensorProto.EXTERNAL]
    spans = [_external_span(t, base_dir) for t in externals]  # every check before anything is read
    for t, span in zip(externals, spans):
        t.raw_data = _read_bytes(span, repr(t.name))
        del t.external_data[:]
        t.ClearField("data_location")


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
    _check_model_file(p)
    with open(p, "rb") as f:
        data = f.read()
    model = _parse_model(data, p)
    del data
    if load_external:
        load_external_data(model, p)
    return model


def load_external_data(model: onnx.ModelProto, model_path: str | os.PathLike) -> None:
    """Read the external data of a model loaded with ``load_external=False`` (same checks as load_model)."""
    _load_external_data(model, os.path.dirname(os.path.abspath(os.fspath(model_path))))


def _check_model_file(p: str) -> int:
    """The size of the model file, after refusing a missing, empty or oversized one."""
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
    return size


def _parse_model(data: bytes | bytearray | memoryview, p: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, or RuntimeError from some backends
        raise InputError(f"{p!r} is not an ONNX model (protobuf parse failed: {exc})") from None
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise InputError(f"{p!r} is not an ONNX model (ir_version {model.ir_version}, "
                         f"{'has' if model.HasField('graph') else 'no'} graph)")
    return model


# --------------------------------------------------------------------------------------------------
# Reading a model file without holding its weights: the protobuf wire format, just enough of it
#
# A model file is parsed as protobuf after every large float ``raw_data`` in it has been replaced by a
# short random placeholder (found by walking the wire format below); the placeholders tell where each
# tensor's bytes lie in the file, and :meth:`WeightRef.load` reads them from there when needed. The
# parsed model is then as small as its graph, and only one tensor at a time is in memory.

#: Float raw_data of at least this many bytes is left in the file and read when needed; smaller tensors
#: are parsed with the graph (a placeholder would save nothing).
STREAM_MIN_BYTES = 1024
#: Message kinds on the path from ModelProto to every TensorProto (field numbers from onnx.proto).
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _TRAINING, _FUNCTION = range(8)
#: kind -> {field number of a length-delimited sub-message: its kind}. Attribute fields are followed
#: whatever the attribute's declared type, like :func:`iter_all_tensors`.
WIRE_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 10: _TENSOR, 6: _GRAPH, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}
_TENSOR_DATA_TYPE, _TENSOR_RAW_DATA, _TENSOR_DATA_LOCATION = 2, 9, 14
_RAW_DATA_TAG = bytes([_TENSOR_RAW_DATA << 3 | 2])
#: Placeholder: 16 random bytes per run (a file cannot forge them), then the span's index (uint64 LE).
PLACEHOLDER_BYTES = 24


class WireError(Exception):
    """The bytes are not well-formed protobuf; the caller falls back to protobuf's own parser."""


class Hole(NamedTuple):
    """``length`` bytes to be supplied later, identified by ``key``, in a rewritten message."""

    length: int
    key: int


def read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError(f"bad varint at {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wire_fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of its length varint or value, value start, value end) per field."""
    pos = start
    while pos < end:
        key, p = read_varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise WireError(f"field number 0 at {pos}")
        if wt == 0:
            v, q = p, read_varint(buf, p, end)[1]
        elif wt == 1 or wt == 5:
            v, q = p, p + (8 if wt == 1 else 4)
        elif wt == 2:
            length, v = read_varint(buf, p, end)
            q = v + length
        else:
            raise WireError(f"wire type {wt} at {pos}")  # groups: never in ONNX
        if q > end:
            raise WireError(f"field {num} at {pos} runs past its message")
        yield num, wt, p, v, q
        pos = q


def piece_length(piece) -> int:
    return piece.length if isinstance(piece, Hole) else len(piece)


def rewrite_message(buf, start: int, end: int, kind: int, on_tensor) -> list | None:
    """The message ``buf[start:end]`` as a list of pieces (bytes-likes and :class:`Hole` s) after
    ``on_tensor(buf, start, end)`` rewrote the TensorProtos it reaches, or None if nothing changed.
    Enclosing length prefixes are recomputed."""
    if kind == _TENSOR:
        return on_tensor(buf, start, end)
    children = WIRE_CHILDREN.get(kind)
    if not children:
        return None
    pieces: list = []
    last = start
    for num, wt, len_at, vs, ve in wire_fields(buf, start, end):
        child = children.get(num) if wt == 2 else None
        if child is None:
            continue
        sub = rewrite_message(buf, vs, ve, child, on_tensor)
        if sub is None:
            continue
        pieces.append(buf[last:len_at])
        pieces.append(encode_varint(sum(piece_length(x) for x in sub)))
        pieces.extend(sub)
        last = ve
    if not pieces:
        return None
    pieces.append(buf[last:end])
    return pieces


def _strip_raw_data(buf, size: int, nonce: bytes) -> tuple[list | None, list[tuple[int, int]]]:
    """Pieces of the model file with large float raw_data replaced by placeholders; their (offset, length)."""
    spans: list[tuple[int, int]] = []

    def on_tensor(buf, start: int, end: int) -> list | None:
        data_type = location = 0
        raws = []
        for num, wt, len_at, vs, ve in wire_fields(buf, start, end):
            if num == _TENSOR_DATA_TYPE and wt == 0:
                data_type = read_varint(buf, vs, ve)[0]
            elif num == _TENSOR_DATA_LOCATION and wt == 0:
                location = read_varint(buf, vs, ve)[0]
            elif num == _TENSOR_RAW_DATA and wt == 2:
                raws.append((len_at, vs, ve))
        if data_type not in FLOAT_DTYPES or location == TensorProto.EXTERNAL or not raws:
            return None
        if all(ve - vs < STREAM_MIN_BYTES for _, vs, ve in raws):
            return None
        pieces: list = []
        last = start
        for len_at, vs, ve in raws:  # protobuf keeps the last raw_data; each gets its own placeholder
            pieces.append(buf[last:len_at])
            pieces.append(encode_varint(PLACEHOLDER_BYTES) + nonce + len(spans).to_bytes(8, "little"))
            spans.append((vs, ve - vs))
            last = ve
        pieces.append(buf[last:end])
        return pieces

    return rewrite_message(buf, 0, size, _MODEL, on_tensor), spans


def _placeholder_index(t: TensorProto, nonce: bytes) -> int | None:
    if not t.HasField("raw_data") or t.data_type not in FLOAT_DTYPES:
        return None
    raw = t.raw_data
    if len(raw) != PLACEHOLDER_BYTES or not raw.startswith(nonce):
        return None
    return int.from_bytes(raw[len(nonce):], "little")


class ScannedModel(NamedTuple):
    """A model file split into its graph skeleton and weights read on demand (see :func:`scan_model`)."""

    graph: bytes  # the graph blob, as extract_weights returns it
    weights: list[WeightRef]
    original_bytes: int  # the model file plus the external data files it uses
    files: tuple[str, ...]  # real paths of the model file and of those external data files


def scan_model(path: str | os.PathLike) -> ScannedModel:
    """Split a model file into graph blob and weights like ``extract_weights(load_model(path))``, with
    the same checks and the same graph blob, but without reading the weights into memory: each
    :class:`WeightRef` reads its values from the model file or its external data file when loaded.

    Raises:
        InputError: as :func:`load_model` and :func:`extract_weights`.
    """
    import mmap

    p = os.fspath(path)
    size = _check_model_file(p)
    nonce = os.urandom(PLACEHOLDER_BYTES - 8)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:  # slices of an mmap are bytes copies: nothing keeps the map open after this block
            pieces, offsets = _strip_raw_data(mm, size, nonce)
        except (WireError, RecursionError):
            pieces, offsets = None, []  # not well-formed: protobuf's parser says what is wrong
        data = mm[:] if pieces is None else b"".join(pieces)
        del pieces
    model = _parse_model(data, p)
    del data
    base_dir = os.path.dirname(os.path.abspath(p))
    real = os.path.realpath(p)
    spans: dict[int, _Span] = {}
    keep = []  # the tensors, so that their ids stay theirs
    files = {real: size}
    externals = []
    for t in iter_all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            externals.append(t)
            continue
        index = _placeholder_index(t, nonce)
        if index is not None:
            if index >= len(offsets):  # pragma: no cover - the nonce is secret
                raise InputError(f"tensor {t.name!r}: raw_data looks like a dcz placeholder")
            keep.append(t)
            spans[id(t)] = _Span(real, *offsets[index], False)
    for t in externals:  # every check before anything is read
        span = _external_span(t, base_dir)
        files.setdefault(span.path, os.path.getsize(span.path))
        keep.append(t)
        spans[id(t)] = span
    slot_ids = {id(s.tensor) for s in _iter_slots(model) if s.tensor.data_type in FLOAT_DTYPES}
    for t in keep:  # tensors that stay in the graph (not float weights): their bytes go back in
        if id(t) not in slot_ids:
            span = spans.pop(id(t))
            t.raw_data = _read_bytes(span, repr(t.name))
            if span.external:
                del t.external_data[:]
                t.ClearField("data_location")
    graph, weights = _take_weights(model, spans)
    return ScannedModel(graph, weights, sum(files.values()), tuple(files))

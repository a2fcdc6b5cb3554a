"""Last stage: put weights back into the graph skeleton and write the ONNX model.

:func:`rebuild` is the mirror of :func:`dcformat.onnx_ingest.extract_weights`: it fills every marked slot
of the graph blob from a name -> array mapping and restores each TensorProto field for field (the data
goes back into the field it came from, ``raw_data`` for nearly all real models). :func:`save_model`
writes the model atomically, moving large tensors to one external data file beside it when the model
would not fit in a single protobuf message.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto

from dcformat.errors import CorruptError, InputError, LimitError
from dcformat.onnx_ingest import (
    DATA_FIELDS,
    FIELD_NONE,
    FLOAT_DTYPES,
    MARKER_KEY_FIELD,
    MARKER_KEY_LOCATION,
    MARKER_KEY_NAME,
    MARKER_LOCATION,
    PLACEHOLDER_BYTES,
    Hole,
    WireError,
    encode_varint,
    iter_all_tensors,
    piece_length,
    read_varint,
    rewrite_message,
    wire_fields,
)

__all__ = ["rebuild", "save_model", "write_model", "SlotSpec", "PROTOBUF_LIMIT_BYTES", "MAX_SINGLE_FILE_BYTES",
           "EXTERNAL_MIN_TENSOR_BYTES"]

#: protobuf cannot serialize or parse a message of 2 GiB or more.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
#: :func:`write_model` writes a model bigger than this with external data (read when called, so that
#: tests can lower it to exercise the external-data path on a small model).
MAX_SINGLE_FILE_BYTES = PROTOBUF_LIMIT_BYTES
#: When saving with external data, tensors smaller than this stay inline (the onnx library's default too):
#: moving tiny shape constants out gains nothing.
EXTERNAL_MIN_TENSOR_BYTES = 1024
#: Tensors of at least this size start at a multiple of EXTERNAL_ALIGN_BYTES in the data file, so that
#: runtimes can memory-map them (onnx's own defaults: 1 MiB threshold, 64 KiB allocation granularity).
EXTERNAL_ALIGN_THRESHOLD_BYTES = 1 << 20
EXTERNAL_ALIGN_BYTES = 1 << 16
#: How many names an error about unused weights lists before "...".
_MAX_NAMES_IN_MESSAGE = 5


def _parse_marker(t: TensorProto) -> tuple[str, str, str]:
    """(weight name, data field, data_location state) of a slot; CorruptError if it is not a dcz slot."""
    entries: dict[str, str] = {}
    for e in t.external_data:
        if not isinstance(e.key, str) or not isinstance(e.value, str):  # protobuf gives bytes for invalid UTF-8
            raise CorruptError(
                f"graph tensor {t.name!r}: external_data entry {e.key!r}: {e.value!r} is not valid UTF-8")
        if e.key in entries:
            raise CorruptError(f"graph tensor {t.name!r}: external_data key {e.key!r} appears twice")
        entries[e.key] = e.value
    if entries.get("location") != MARKER_LOCATION:
        raise CorruptError(f"graph tensor {t.name!r} refers to external data {entries.get('location')!r}; "
                           f"a .dcz graph may only hold dcz slots (location {MARKER_LOCATION!r})")
    expected_keys = {"location", MARKER_KEY_NAME, MARKER_KEY_FIELD, MARKER_KEY_LOCATION}
    if set(entries) != expected_keys:
        raise CorruptError(f"graph tensor {t.name!r}: slot keys {sorted(entries)}, expected {sorted(expected_keys)}")
    name, field, loc = entries[MARKER_KEY_NAME], entries[MARKER_KEY_FIELD], entries[MARKER_KEY_LOCATION]
    if t.data_type not in FLOAT_DTYPES:
        raise CorruptError(f"slot {name!r} has data type {t.data_type}, not a float type "
                           f"({', '.join(onnx.helper.tensor_dtype_to_string(d) for d in FLOAT_DTYPES)})")
    if field not in ("raw_data", FLOAT_DTYPES[t.data_type][1], FIELD_NONE):
        raise CorruptError(f"slot {name!r}: data field {field!r} is not valid for "
                           f"{onnx.helper.tensor_dtype_to_string(t.data_type)}")
    if loc not in ("set", "unset"):
        raise CorruptError(f"slot {name!r}: {MARKER_KEY_LOCATION} is {loc!r}, expected 'set' or 'unset'")
    for f in DATA_FIELDS:
        if (t.HasField(f) if f == "raw_data" else len(getattr(t, f))):
            raise CorruptError(f"slot {name!r} already holds data in {f}")
    return name, field, loc


def _parse_graph(graph_blob: bytes) -> onnx.ModelProto:
    """The GRAPH section as a ModelProto; CorruptError if it is not one, or holds no graph."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(bytes(graph_blob))
    except Exception as exc:
        raise CorruptError(f"graph blob ({len(graph_blob)} bytes) is not an ONNX ModelProto: {exc}") from None
    if not model.HasField("graph"):
        raise CorruptError(f"graph blob ({len(graph_blob)} bytes) parses but holds no graph")
    return model


def rebuild(graph_blob: bytes, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Fill the slots of ``graph_blob`` from ``weights`` and return the complete model.

    Each array must have exactly the slot's shape and the dtype :class:`dcformat.onnx_ingest.Weight`
    uses for its ONNX type (float32, float16, float64; uint16 bit patterns for BFLOAT16; either byte
    order). Data is written bit-exactly.

    Raises:
        CorruptError: the blob is not a ModelProto with a graph; a slot is malformed or names a weight
            missing from ``weights``; two slots name the same weight; an array's shape or dtype does not
            match its slot; a weight is used by no slot; a tensor refers to real external data.
    """
    model = _parse_graph(graph_blob)
    for t, name, field, loc in _slots(model, weights):
        _fill_slot(t, name, field, np.asarray(weights[name]))
        _restore_location(t, loc)
    return model


def _slots(model: onnx.ModelProto, weights: Mapping) -> Iterator[tuple[TensorProto, str, str, str]]:
    """Every dcz slot of ``model`` as (tensor, weight name, data field, location state), checked: a valid marker
    naming a weight of ``weights``, no weight named twice; once all are seen, every weight must have had a slot."""
    used: set[str] = set()
    for t in iter_all_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        name, field, loc = _parse_marker(t)
        if name in used:
            raise CorruptError(f"weight {name!r} is named by two slots of the graph")
        if name not in weights:
            raise CorruptError(f"slot {name!r} of the graph has no weight")
        used.add(name)
        yield t, name, field, loc
    unused = [n for n in weights if n not in used]
    if unused:
        shown = ", ".join(repr(n) for n in unused[:_MAX_NAMES_IN_MESSAGE])
        more = f" and {len(unused) - _MAX_NAMES_IN_MESSAGE} more" if len(unused) > _MAX_NAMES_IN_MESSAGE else ""
        raise CorruptError(f"{len(unused)} weight(s) match no slot of the graph: {shown}{more}")


def _restore_location(t: TensorProto, loc: str) -> None:
    """A filled slot's data_location as the original had it: DEFAULT when it was set, absent when not."""
    if loc == "set":
        t.data_location = TensorProto.DEFAULT
    else:
        t.ClearField("data_location")


def _check_fits(t: TensorProto, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """CorruptError unless values of ``dtype`` and ``shape`` fit the slot ``t``."""
    want = FLOAT_DTYPES[t.data_type][0]
    if dtype.kind != want.kind or dtype.itemsize != want.itemsize:
        raise CorruptError(f"weight {name!r}: array dtype {dtype}, slot type "
                           f"{onnx.helper.tensor_dtype_to_string(t.data_type)} needs {want.newbyteorder('=')}")
    slot_shape = tuple(int(d) for d in t.dims)
    if tuple(shape) != slot_shape:
        raise CorruptError(f"weight {name!r}: array shape {tuple(shape)}, slot dims {list(slot_shape)}")


def _fill_slot(t: TensorProto, name: str, field: str, arr: np.ndarray) -> None:
    dtype, typed_field = FLOAT_DTYPES[t.data_type]
    _check_fits(t, name, arr.dtype, arr.shape)
    del t.external_data[:]
    le = np.ascontiguousarray(arr, dtype=dtype)
    if field == "raw_data":
        t.raw_data = le.tobytes()
    elif field == FIELD_NONE:
        if le.size:
            raise CorruptError(f"weight {name!r}: slot declares no data but the array has {le.size} elements")
    elif typed_field == "int32_data":
        t.int32_data.extend(le.view("<u2").astype(np.int64).ravel().tolist())
    else:
        # Merge one packed field (tag, varint length, little-endian values): exact bits, no Python floats.
        payload = le.tobytes()
        t.MergeFromString(encode_varint(TensorProto.DESCRIPTOR.fields_by_name[field].number << 3 | 2)
                          + encode_varint(len(payload)) + payload)




# --------------------------------------------------------------------------------------------------
# Saving


def _temp_beside(target: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes 0600; give the file the usual permissions
    return fd, Path(name)


def _write_file(fd: int, chunks) -> None:
    with os.fdopen(fd, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               max_single_file_bytes: int = PROTOBUF_LIMIT_BYTES) -> None:
    """Write ``model`` to ``path`` atomically.

    If the serialized model is larger than ``max_single_file_bytes`` (default: the 2 GiB protobuf
    limit), every tensor of at least EXTERNAL_MIN_TENSOR_BYTES of raw data is written to one external
    data file ``<file name>.data`` beside the model (also atomically) and the model refers to it. The
    caller's model is left unchanged either way. On failure nothing is left at the target paths.

    Raises:
        InputError: the target folder does not exist.
        LimitError: even with external data the model's structure exceeds the protobuf limit.
        OSError: writing failed (temporary files are removed).
    """
    target = Path(os.fspath(path))
    if not target.parent.is_dir():
        raise InputError(f"cannot save model to {str(target)!r}: folder {str(target.parent)!r} does not exist")
    if model.ByteSize() <= max_single_file_bytes:
        fd, tmp = _temp_beside(target)
        try:
            _write_file(fd, [model.SerializeToString()])
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    _save_with_external_data(model, target)


def _save_with_external_data(model: onnx.ModelProto, target: Path) -> None:
    data_path = target.with_name(target.name + ".data")
    moved: list[tuple[TensorProto, int, int, bool]] = []  # (tensor, offset, length, had data_location)
    data_fd, data_tmp = _temp_beside(data_path)
    model_tmp: Path | None = None
    try:
        df = os.fdopen(data_fd, "w+b")
        try:
            offset = 0
            for t in iter_all_tensors(model):
                if (t.data_location == TensorProto.EXTERNAL or not t.HasField("raw_data")
                        or len(t.raw_data) < EXTERNAL_MIN_TENSOR_BYTES):
                    continue
                data = t.raw_data
                if len(data) >= EXTERNAL_ALIGN_THRESHOLD_BYTES and offset % EXTERNAL_ALIGN_BYTES:
                    pad = EXTERNAL_ALIGN_BYTES - offset % EXTERNAL_ALIGN_BYTES
                    df.write(b"\0" * pad)
                    offset += pad
                df.write(data)
                moved.append((t, offset, len(data), t.HasField("data_location")))
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_path.name), ("offset", str(offset)),
                                   ("length", str(len(data)))):
                    e = t.external_data.add()
                    e.key, e.value = key, value
                offset += len(data)
                del data
            df.flush()
            os.fsync(df.fileno())
            skeleton_size = model.ByteSize()
            if skeleton_size > PROTOBUF_LIMIT_BYTES:
                raise LimitError(f"model {str(target)!r}: {skeleton_size} bytes without its large tensors, "
                                 f"over the protobuf limit of {PROTOBUF_LIMIT_BYTES} bytes")
            model_fd, model_tmp = _temp_beside(target)
            _write_file(model_fd, [model.SerializeToString()])
        finally:
            # Whatever happened, put the caller's model back as it was, from the bytes just written.
            for t, off, length, had_loc in moved:
                df.seek(off)
                t.raw_data = df.read(length)
                del t.external_data[:]
                if had_loc:
                    t.data_location = TensorProto.DEFAULT
                else:
                    t.ClearField("data_location")
            df.close()
        _install(data_tmp, data_path, model_tmp, target)
    except BaseException:
        data_tmp.unlink(missing_ok=True)
        if model_tmp is not None:
            model_tmp.unlink(missing_ok=True)
        raise


def _install(data_tmp: Path, data_path: Path, model_tmp: Path, target: Path) -> None:
    """Rename the external data file, then the model, into place; if the model cannot follow, the data goes too."""
    os.replace(data_tmp, data_path)
    try:
        os.replace(model_tmp, target)
    except BaseException:
        data_path.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# Writing a model tensor by tensor


class SlotSpec(NamedTuple):
    """What a weight will decode to: its shape and numpy dtype (any byte order)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def write_model(graph_blob: bytes, weights: Mapping[str, SlotSpec], decode: Callable[[str], np.ndarray],
                path: str | os.PathLike, *, max_single_file_bytes: int | None = None) -> None:
    """Write the model that ``rebuild(graph_blob, {n: decode(n) for n in weights})`` gives, with the same
    bytes as ``save_model`` would write, but holding one weight in memory at a time.

    ``decode(name)`` is called once per weight, in the order the file needs them. The model goes into
    one file if it fits in ``max_single_file_bytes`` (default MAX_SINGLE_FILE_BYTES), else its large
    tensors go into ``<file name>.data`` beside it, written tensor by tensor. Atomic like save_model.

    Raises:
        CorruptError: as :func:`rebuild` (checked before anything is written), or a decoded array
            differs from its SlotSpec.
        InputError, LimitError, OSError: as :func:`save_model`.
    """
    limit = MAX_SINGLE_FILE_BYTES if max_single_file_bytes is None else max_single_file_bytes
    target = Path(os.fspath(path))
    if not target.parent.is_dir():
        raise InputError(f"cannot save model to {str(target)!r}: folder {str(target.parent)!r} does not exist")
    model = _parse_graph(graph_blob)
    nonce = os.urandom(PLACEHOLDER_BYTES - 8)
    holes: list[tuple[str, SlotSpec]] = []  # placeholder index -> weight
    for t, name, field, loc in _slots(model, weights):  # every check before anything is decoded or written
        spec = weights[name]
        _check_fits(t, name, np.dtype(spec.dtype), spec.shape)
        if field == "raw_data":
            del t.external_data[:]
            t.raw_data = nonce + len(holes).to_bytes(8, "little")
            holes.append((name, spec))
        else:  # typed fields (hand-made models): filled now, in the graph
            _fill_slot(t, name, field, _decoded(name, spec, decode))
        _restore_location(t, loc)

    blob = model.SerializeToString()
    pieces = _expand_placeholders(blob, nonce, holes)
    if sum(piece_length(x) for x in pieces) <= limit:
        del model
        fd, tmp = _temp_beside(target)
        try:
            with os.fdopen(fd, "wb") as f:
                for piece in pieces:
                    if isinstance(piece, Hole):
                        name, spec = holes[piece.key]
                        f.write(memoryview(_le_bytes(name, spec, decode)).cast("B"))
                    else:
                        f.write(piece)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    del pieces, blob
    _write_with_external_data(model, target, nonce, holes, decode)


def _decoded(name: str, spec: SlotSpec, decode: Callable[[str], np.ndarray]) -> np.ndarray:
    arr = np.asarray(decode(name))
    if arr.dtype != np.dtype(spec.dtype) or arr.shape != tuple(spec.shape):
        raise CorruptError(f"weight {name!r} decoded to {arr.dtype} {arr.shape}, its record says "
                           f"{np.dtype(spec.dtype)} {tuple(spec.shape)}")
    return arr


def _le_bytes(name: str, spec: SlotSpec, decode: Callable[[str], np.ndarray]) -> np.ndarray:
    """The weight's little-endian bytes, as _fill_slot stores them in raw_data (a contiguous array)."""
    arr = _decoded(name, spec, decode)
    want = np.dtype(spec.dtype).newbyteorder("<")
    return np.ascontiguousarray(arr, dtype=want).reshape(-1)


def _expand_placeholders(blob: bytes, nonce: bytes, holes: list) -> list:
    """The serialized model as pieces, each placeholder raw_data a :class:`Hole` of the weight's size."""
    found = 0

    def on_tensor(buf, start: int, end: int) -> list | None:
        nonlocal found
        for num, wt, len_at, vs, ve in wire_fields(buf, start, end):
            if num == 9 and wt == 2 and ve - vs == PLACEHOLDER_BYTES and buf[vs:vs + len(nonce)] == nonce:
                key = int.from_bytes(buf[vs + len(nonce):ve], "little")
                name, spec = holes[key]
                n = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
                found += 1
                return [buf[start:len_at], encode_varint(n), Hole(n, key), buf[ve:end]]
        return None

    try:
        pieces = rewrite_message(memoryview(blob), 0, len(blob), 0, on_tensor)
    except WireError as exc:  # pragma: no cover - protobuf's own output
        raise CorruptError(f"graph: serialized model is not well-formed ({exc})") from None
    if found != len(holes):  # pragma: no cover - the walk visits what iter_all_tensors visits
        raise CorruptError(f"graph: {len(holes)} slots, {found} found in the serialized model")
    return pieces if pieces is not None else [blob]


def _write_with_external_data(model: onnx.ModelProto, target: Path, nonce: bytes, holes: list,
                              decode: Callable[[str], np.ndarray]) -> None:
    """As _save_with_external_data, with each slot's bytes decoded straight into the data file."""
    data_path = target.with_name(target.name + ".data")
    plan: list[tuple[int, int, object]] = []  # (offset, length, hole index or bytes), in file order
    offset = 0
    for t in iter_all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL or not t.HasField("raw_data"):
            continue
        raw = t.raw_data
        key = None
        if len(raw) == PLACEHOLDER_BYTES and raw.startswith(nonce):
            key = int.from_bytes(raw[len(nonce):], "little")
            name, spec = holes[key]
            length = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
            if length < EXTERNAL_MIN_TENSOR_BYTES:
                t.raw_data = _le_bytes(name, spec, decode).tobytes()
                continue
        else:
            length = len(raw)
            if length < EXTERNAL_MIN_TENSOR_BYTES:
                continue
        if length >= EXTERNAL_ALIGN_THRESHOLD_BYTES and offset % EXTERNAL_ALIGN_BYTES:
            offset += EXTERNAL_ALIGN_BYTES - offset % EXTERNAL_ALIGN_BYTES
        plan.append((offset, length, key if key is not None else raw))
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        offset += length
        del raw
    skeleton_size = model.ByteSize()
    if skeleton_size > PROTOBUF_LIMIT_BYTES:
        raise LimitError(f"model {str(target)!r}: {skeleton_size} bytes without its large tensors, "
                         f"over the protobuf limit of {PROTOBUF_LIMIT_BYTES} bytes")
    data_fd, data_tmp = _temp_beside(data_path)
    model_tmp: Path | None = None
    try:
        with os.fdopen(data_fd, "wb") as df:
            pos = 0
            for off, length, source in plan:
                if off > pos:
                    df.write(b"\0" * (off - pos))
                if isinstance(source, int):
                    name, spec = holes[source]
                    df.write(memoryview(_le_bytes(name, spec, decode)).cast("B"))
                else:
                    df.write(source)
                pos = off + length
            df.flush()
            os.fsync(df.fileno())
        model_fd, model_tmp = _temp_beside(target)
        _write_file(model_fd, [model.SerializeToString()])
        _install(data_tmp, data_path, model_tmp, target)
    except BaseException:
        data_tmp.unlink(missing_ok=True)
        if model_tmp is not None:
            model_tmp.unlink(missing_ok=True)
        raise

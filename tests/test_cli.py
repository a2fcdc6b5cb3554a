"""The dcz command line: help, every command on a real model, machine output, and clean one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from dcformat.cli import main
from dcformat.demo import bundled


@pytest.fixture
def lenet(tmp_path):
    p = tmp_path / "lenet.onnx"
    shutil.copyfile(bundled("lenet300.onnx"), p)
    return p


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.mark.parametrize("cmd", [[], ["compress"], ["decompress"], ["inspect"], ["demo"]])
def test_help(cmd):
    r = run(*cmd, "--help")
    assert r.exit_code == 0 and "Usage:" in r.output


def test_compress_inspect_decompress(lenet, tmp_path):
    r = run("compress", lenet, "--preset", "paper", "--sparsity", "fc=0.5", "--layer", "ip3.*:raw")
    assert r.exit_code == 0, r.output
    dcz = lenet.with_suffix(".dcz")
    assert dcz.exists() and "x)" in r.output
    r = run("inspect", dcz)
    assert r.exit_code == 0 and "ip1.weight" in r.output and "entropy bound" in r.output
    doc = json.loads(run("inspect", dcz, "--json").output)
    rows = {t["name"]: t for t in doc["tensors"]}
    assert rows["ip1.weight"]["layout"] in ("sparse", "dense") and rows["ip1.weight"]["bits"] == 5
    assert abs(rows["ip1.weight"]["sparsity"] - 0.5) < 1e-3
    assert rows["ip3.weight"]["layout"] == "raw"
    assert doc["file_bytes"] == dcz.stat().st_size
    out = tmp_path / "back.onnx"
    r = run("decompress", dcz, "-o", out)
    assert r.exit_code == 0 and out.exists()


def test_compress_json_and_check(lenet, tmp_path):
    with np.load(bundled("mnist_test.npz")) as z:
        np.savez(tmp_path / "in.npz", input=z["x"][:50])
    r = run("compress", lenet, "--json", "--inputs", tmp_path / "in.npz")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["dcz_bytes"] < doc["original_bytes"] and doc["fidelity"][0]["top1_agreement"] >= 0.98


@pytest.mark.parametrize(
    "args, message",
    [
        (["compress", "missing.onnx"], "not found"),
        (["compress", "{lenet}", "--bits", "conv=99"], "bits"),
        (["compress", "{lenet}", "--sparsity", "attention=0.5"], "unknown op kind"),
        (["compress", "{lenet}", "--layer", "nocolon"], "PATTERN:key=value"),
        (["compress", "{text}"], "not"),
        (["inspect", "{text}"], "not a .dcz file"),
        (["decompress", "{text}"], "not a .dcz file"),
        (["decompress", "missing.dcz"], "no such file"),
    ],
)
def test_errors_are_one_line(args, message, lenet, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a model\n" * 4)
    args = [a.format(lenet=lenet, text=text) for a in args]
    r = run(*args)
    assert r.exit_code == 1
    assert r.output.startswith("dcz: error:") and message in r.output
    assert "Traceback" not in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "lenet.dcz").exists() and not list(tmp_path.glob(".dcz-*"))


def test_refuses_to_overwrite_without_force(lenet):
    assert run("compress", lenet).exit_code == 0
    r = run("compress", lenet)
    assert r.exit_code == 1 and "already exists" in r.output
    assert run("compress", lenet, "--force").exit_code == 0


def test_never_overwrites_input(lenet):
    r = run("compress", lenet, "-o", lenet, "--force")
    assert r.exit_code == 1 and "is the input" in r.output
    assert lenet.read_bytes() == bundled("lenet300.onnx").read_bytes()


def test_says_when_the_file_grows(lenet, tmp_path):
    """A model too small to have a weight worth coding gets a .dcz larger than itself, and the user is told why."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    tiny = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph), tiny)
    r = run("compress", tiny)
    assert r.exit_code == 0, r.output
    assert tiny.with_suffix(".dcz").stat().st_size > tiny.stat().st_size
    assert "larger than the original: no weight was coded (weights under --min-elements, 1,024," in r.output
    r = run("compress", lenet)
    assert r.exit_code == 0 and "larger than the original" not in r.output


def test_quiet_prints_nothing(lenet):
    r = run("compress", lenet, "-q")
    assert r.exit_code == 0 and r.output == ""


def test_demo_runs():
    r = run("demo")
    assert r.exit_code == 0, r.output
    assert "accuracy on 500 held-out MNIST test digits" in r.output

"""Tests of tools/natural_inputs.py on the public models: feeds fit the graph, run, differ by split, look real."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from dcformat.errors import InputError
from dcformat.fidelity import random_inputs, run
from models import BIG_MODELS, MODEL_NAMES, fetch_models, model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
import natural_inputs as N  # noqa: E402

pytestmark = pytest.mark.realmodel


def _names(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in BIG_MODELS else n for n in names]


@functools.lru_cache(maxsize=None)
def _sample(name: str, split: str, seed: int = 0) -> N.NaturalSample:
    return N.natural_sample(name, model_path(name), seed=seed, split=split)


@functools.lru_cache(maxsize=None)
def _outputs(name: str, split: str) -> dict[str, np.ndarray]:
    return run(model_path(name), _sample(name, split).feeds)


def _declared(path: Path) -> dict[str, tuple[np.dtype, list[int | None]]]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for v in model.graph.input:
        if v.name not in inits:
            tt = v.type.tensor_type
            out[v.name] = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)),
                           [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                            for d in tt.shape.dim])
    return out


ALL_NAMES = (*MODEL_NAMES, *fetch_models.BUNDLED)  # the downloaded models and the ones in dcformat/data


def test_every_public_model_is_supported():
    assert set(N.SUPPORTED) == set(ALL_NAMES)


@pytest.mark.parametrize("name", _names(ALL_NAMES))
def test_feeds_match_declared_inputs_and_run(name):
    declared = _declared(model_path(name))
    for split in N.SPLITS:
        sample = _sample(name, split)
        assert set(sample.feeds) == set(declared)
        for key, (dtype, dims) in declared.items():
            arr = sample.feeds[key]
            assert arr.dtype == dtype, key
            assert arr.ndim == len(dims), key
            assert all(d is None or d == s for s, d in zip(arr.shape, dims)), (key, arr.shape, dims)
            if arr.dtype.kind == "f":
                assert np.isfinite(arr).all(), key
        assert len(sample.truth) >= 1
        outs = _outputs(name, split)
        assert outs
        for key, value in outs.items():
            if np.asarray(value).dtype.kind == "f":
                assert np.isfinite(value).all(), key


@pytest.mark.parametrize("name", _names(ALL_NAMES))
def test_splits_differ_and_are_reproducible(name):
    test, cal = _sample(name, "test"), _sample(name, "calibration")
    differing = [k for k in test.feeds if not np.array_equal(test.feeds[k], cal.feeds[k])]
    assert differing, "calibration and test feeds are identical"
    again = N.natural_sample(name, model_path(name), seed=0, split="test")
    for k, v in test.feeds.items():
        np.testing.assert_array_equal(again.feeds[k], v)
    assert again.truth == test.truth


@pytest.mark.parametrize("name", _names(["ppocr-rec", "ppocr-det", "ddddocr-common"]))
def test_text_of_splits_is_disjoint(name):
    test = {t for s in range(3) for t in _sample(name, "test", s).truth}
    cal = {t for s in range(3) for t in _sample(name, "calibration", s).truth}
    assert not test & cal


def test_different_seeds_differ():
    a = _sample("ppocr-rec", "test", 0)
    b = _sample("ppocr-rec", "test", 1)
    assert a.truth != b.truth


def test_unknown_name_and_split_are_refused():
    path = model_path("logreg-iris")
    with pytest.raises(InputError, match="no natural inputs for model 'nope'"):
        N.natural_inputs("nope", path)
    with pytest.raises(InputError, match="split must be one of"):
        N.natural_inputs("logreg-iris", path, split="train")


def test_wrong_model_for_name_is_refused():
    with pytest.raises(InputError, match="expected one input of rank 4"):
        N.natural_inputs("ppocr-rec", model_path("logreg-iris"))


# --------------------------------------------------------------------------- the inputs are realistic, not noise
def _ctc(ids: np.ndarray) -> list[int]:
    keep = np.concatenate([[True], ids[1:] != ids[:-1]]) & (ids != 0)
    return ids[keep].tolist()


def test_ppocr_rec_reads_the_rendered_lines():
    path = model_path("ppocr-rec")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    chars = ["<blank>"] + meta["character"].splitlines() + [" "]  # rapidocr's CTC label list
    prob = _outputs("ppocr-rec", "test")["softmax_11.tmp_0"]
    read = ["".join(chars[i] for i in _ctc(row)).strip() for row in prob.argmax(-1)]
    truth = list(_sample("ppocr-rec", "test").truth)
    assert sum(r == t for r, t in zip(read, truth)) >= len(truth) - 1, (read, truth)
    noise = run(path, random_inputs(path, shape_overrides={"x": _sample("ppocr-rec", "test").feeds["x"].shape}))
    assert (noise["softmax_11.tmp_0"].argmax(-1) != 0).sum() < (prob.argmax(-1) != 0).sum()


def test_ppocr_cls_tells_upright_from_upside_down():
    probs = _outputs("ppocr-cls", "test")["save_infer_model/scale_0.tmp_1"]
    pred = tuple(("0", "180")[i] for i in probs.argmax(1))
    assert pred == _sample("ppocr-cls", "test").truth


def test_ppocr_det_sees_text():
    heat = _outputs("ppocr-det", "test")["sigmoid_0.tmp_0"]
    assert heat.max() > 0.3
    assert 0.01 < (heat > 0.3).mean() < 0.5  # text covers part of the page, not all of it


def test_ddddocr_det_finds_characters():
    out = _outputs("ddddocr-det", "test")["output"][0]
    assert (out[:, 4] * out[:, 5]).max() > 0.5


def test_centerface_faces_score_above_background():
    heat = _outputs("centerface", "test")["537"].reshape(len(_sample("centerface", "test").truth), -1).max(1)
    truth = np.array(_sample("centerface", "test").truth)
    assert heat[truth == "face"].min() > 0.2
    assert heat[truth == "face"].min() > 5 * heat[truth == "background"].max()


@pytest.mark.parametrize("name", ["silero-vad", "silero-vad-op15"])
def test_silero_hears_speech_not_noise(name):
    prob = _outputs(name, "test")["output"].ravel()
    truth = np.array(_sample(name, "test").truth)
    assert prob[truth == "speech"].max() > 0.5
    assert prob[truth == "noise"].max() < 0.1
    assert np.abs(_sample(name, "test").feeds["state"]).max() > 0.1  # a warm state, not zeros


def test_basic_pitch_hears_the_notes():
    names = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
    notes = {names.index(n[:-1]) + 12 * (int(n[-1]) + 1) for n in _sample("basic-pitch", "test").truth[0].split()}
    outs = _outputs("basic-pitch", "test")
    heard = [set((np.argwhere(v[0] > 0.5)[:, 1] + 21).tolist()) for v in outs.values() if v.shape[-1] == 88]
    assert any(notes <= h for h in heard), (notes, heard)


def test_logreg_iris_gets_real_iris_rows():
    from sklearn.datasets import load_iris

    data = load_iris()
    rows = {tuple(r) for r in data.data[:, :2].astype(np.float32).tolist()}
    for split in N.SPLITS:
        x = _sample("logreg-iris", split).feeds["float_input"]
        assert {tuple(r) for r in x.tolist()} <= rows
    assert _sample("logreg-iris", "test").truth == ("setosa", "versicolor", "virginica")


# --------------------------------------------------------------------------------------------- digits MLP (bundled)
def test_digits_mlp_keeps_its_recorded_accuracy():
    truth = np.array([int(t) for t in _sample("digits-mlp", "test").truth])
    logits = _outputs("digits-mlp", "test")["logits"]
    assert len(truth) == 599 and np.bincount(truth).min() >= 58  # a stratified third of 1,797
    assert int((logits.argmax(1) == truth).sum()) == 589  # tools/train_digits_mlp.py: 98.33 %


def test_digits_calibration_comes_from_the_training_split():
    from sklearn.datasets import load_digits

    X, _ = load_digits(return_X_y=True)
    index = {row.tobytes(): i for i, row in enumerate((X / 16).astype(np.float32))}
    test = {index[r.tobytes()] for r in _sample("digits-mlp", "test").feeds["input"]}
    cal = {index[r.tobytes()] for r in _sample("digits-mlp", "calibration").feeds["input"]}
    assert len(cal) == 200 and not test & cal


# ---------------------------------------------------------------------------------------------------- magika
def test_magika_features_mirror_magika():
    pad = N.MAGIKA_PAD
    row = N.magika_features(b" \t\n#!/bin/sh\necho hi\n\n  ", b" \t\n#!/bin/sh\necho hi\n\n  ")
    body = np.frombuffer(b"#!/bin/sh\necho hi\n\n  ", np.uint8)
    np.testing.assert_array_equal(row[:len(body)], body)  # lstrip only, then padded after
    assert (row[len(body):N.MAGIKA_BEG] == pad).all()
    tail = np.frombuffer(b" \t\n#!/bin/sh\necho hi", np.uint8)  # rstrip only
    np.testing.assert_array_equal(row[-len(tail):], tail)
    assert (row[N.MAGIKA_BEG:-len(tail)] == pad).all()
    assert row.dtype == np.int32 and row.shape == (N.MAGIKA_BEG + N.MAGIKA_END,)
    assert N.magika_features(b"   1234567", b"1234567   ") is None  # 7 bytes after stripping: no model
    big = bytes(range(256)) * 16
    row = N.magika_features(big, big)
    np.testing.assert_array_equal(row[:N.MAGIKA_BEG], np.frombuffer(big[:N.MAGIKA_BEG], np.uint8))
    np.testing.assert_array_equal(row[N.MAGIKA_BEG:], np.frombuffer(big[-N.MAGIKA_END:], np.uint8))


def test_magika_file_features_read_both_ends(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"A" * 5000 + b"Z" * 5000)
    row = N.magika_file_features(p)
    assert (row[:N.MAGIKA_BEG] == ord("A")).all() and (row[N.MAGIKA_BEG:] == ord("Z")).all()
    (tmp_path / "e").write_bytes(b"")
    assert N.magika_file_features(tmp_path / "e") is None


def test_magika_split_files_are_disjoint():
    keys = {split: {k for s in range(3) for _, k, _, _ in N.magika_files(split, np.random.default_rng(s))}
            for split in N.SPLITS}
    assert keys["test"] and keys["calibration"] and not keys["test"] & keys["calibration"]
    assert all(N.magika_split(k) == split for split, ks in keys.items() for k in ks)


def test_magika_names_most_real_files_by_their_extension():
    pred = [N.MAGIKA_LABELS[i] for i in _outputs("magika", "test")["target_label"].argmax(1)]
    truth = _sample("magika", "test").truth
    assert len(set(truth)) >= 15, truth  # many types, not a handful
    assert set(truth) <= set(N.MAGIKA_LABELS)
    assert np.mean([p == t for p, t in zip(pred, truth)]) >= 0.75, list(zip(truth, pred))

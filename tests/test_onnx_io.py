"""ONNX ends of the pipeline: load / extract_weights (onnx_ingest) and rebuild / save_model (onnx_rebuild)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper

from dcformat import onnx_ingest, onnx_rebuild
from dcformat.errors import CorruptError, InputError, LimitError
from dcformat.onnx_ingest import Weight, extract_weights, load_model
from dcformat.onnx_rebuild import rebuild, save_model
import models
from models import BIG_MODELS, MODEL_NAMES, model_path

# --------------------------------------------------------------------------------------------------
# helpers


def _roundtrip(model: onnx.ModelProto) -> tuple[bytes, onnx.ModelProto, list[Weight]]:
    """(original bytes, rebuilt model, weights) for an unchanged extract -> rebuild."""
    original = model.SerializeToString()
    blob, weights = extract_weights(model)
    rebuilt = rebuild(blob, {w.name: w.array for w in weights})
    return original, rebuilt, weights


def _session(model: onnx.ModelProto | str | os.PathLike) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # one thread: results do not depend on how work is split
    so.inter_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def _assert_same_outputs(a: ort.InferenceSession, b: ort.InferenceSession, feeds: dict) -> None:
    out_a, out_b = a.run(None, feeds), b.run(None, feeds)
    assert len(out_a) == len(out_b)
    for x, y in zip(out_a, out_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y, equal_nan=True)


def _model(nodes, inputs, outputs, initializers=(), opset=17, **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _raw_tensor(name: str, arr: np.ndarray, onnx_dtype: int) -> TensorProto:
    t = TensorProto(name=name, data_type=onnx_dtype, dims=arr.shape)
    t.raw_data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    return t


# --------------------------------------------------------------------------------------------------
# every public model: extract -> rebuild is the identity


@pytest.mark.realmodel
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG_MODELS else n
                                  for n in MODEL_NAMES])
def test_public_model_roundtrip_is_byte_identical(name):
    model = load_model(model_path(name))
    original, rebuilt, weights = _roundtrip(model)
    assert rebuilt.SerializeToString() == original
    onnx.checker.check_model(rebuilt, full_check=True)
    assert len({w.name for w in weights}) == len(weights)
    for w in weights:
        assert w.array.dtype == onnx_ingest.FLOAT_DTYPES[w.onnx_dtype][0]
        assert not w.array.flags.writeable
        assert w.kind in ("conv", "fc", "rnn", "embedding", "norm", "other")


@pytest.mark.realmodel
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in BIG_MODELS])
def test_cached_model_matches_recorded_hash(name):
    path = model_path(name)
    assert models.fetch_models.cached_path(name, path.parent, verify_hash=True) == path


# Per-model counts measured on the wheels pinned in tools/fetch_models.py: where the weights live.
EXPECTED_ORIGINS = {
    "ppocr-rec": {"constant": 365},
    "ppocr-cls": {"constant": 285},
    "silero-vad": {"subgraph": 34},
    "silero-vad-op15": {"initializer": 15, "constant": 2},
    "centerface": {"initializer": 135},
    "logreg-iris": {},
}


@pytest.mark.realmodel
@pytest.mark.parametrize("name", sorted(EXPECTED_ORIGINS))
def test_public_model_weights_found_where_they_live(name):
    _, weights = extract_weights(load_model(model_path(name)))
    counts: dict[str, int] = {}
    for w in weights:
        counts[w.origin] = counts.get(w.origin, 0) + 1
    assert counts == EXPECTED_ORIGINS[name]


@pytest.mark.realmodel
def test_skeleton_holds_no_float_data():
    blob, weights = extract_weights(load_model(model_path("silero-vad")))
    skeleton = onnx.ModelProto.FromString(blob)
    slots = [t for t in onnx_ingest.iter_all_tensors(skeleton) if t.data_location == TensorProto.EXTERNAL]
    assert len(slots) == len(weights)
    for t in slots:
        assert not t.HasField("raw_data") and not t.float_data
        assert t.external_data[0].key == "location" and t.external_data[0].value == onnx_ingest.MARKER_LOCATION
    # the blob is small next to the weights it left out
    assert len(blob) < sum(w.array.nbytes for w in weights) / 3


@pytest.mark.realmodel
def test_changed_weights_land_in_their_own_slots():
    blob, weights = extract_weights(load_model(model_path("ppocr-cls")))
    new = {w.name: (w.array * np.float32(2) + np.float32(i)).astype(w.array.dtype) for i, w in enumerate(weights)}
    blob2, weights2 = extract_weights(rebuild(blob, new))
    assert blob2 == blob
    assert [w.name for w in weights2] == [w.name for w in weights]
    for w in weights2:
        assert np.array_equal(w.array, new[w.name])


# --------------------------------------------------------------------------------------------------
# onnxruntime: same outputs from the original and the rebuilt model


@pytest.mark.realmodel
def test_ort_ppocr_rec_constant_weights():
    model = load_model(model_path("ppocr-rec"))
    original, rebuilt, _ = _roundtrip(model)
    x = np.random.default_rng(1).random((1, 3, 48, 160), dtype=np.float32)
    _assert_same_outputs(_session(onnx.ModelProto.FromString(original)), _session(rebuilt), {"x": x})


@pytest.mark.realmodel
def test_ort_silero_vad_subgraph_weights():
    model = load_model(model_path("silero-vad"))
    original, rebuilt, _ = _roundtrip(model)
    a, b = _session(onnx.ModelProto.FromString(original)), _session(rebuilt)
    rng = np.random.default_rng(2)
    for sr, samples in ((16000, 576), (8000, 288)):  # both If branches (their weights differ)
        feeds = {"input": rng.uniform(-1, 1, (1, samples)).astype(np.float32),
                 "state": rng.normal(0, 0.1, (2, 1, 128)).astype(np.float32),
                 "sr": np.array(sr, dtype=np.int64)}
        _assert_same_outputs(a, b, feeds)


@pytest.mark.realmodel
def test_ort_external_data_model(tmp_path):
    src = onnx.load(model_path("silero-vad-op15"))
    original_bytes = src.SerializeToString()
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(src, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.weights", size_threshold=0)
    assert (folder / "m.weights").stat().st_size > 1_000_000
    model = load_model(folder / "m.onnx")
    assert model.SerializeToString() == original_bytes  # external data read back exactly, references cleared
    _, rebuilt, weights = _roundtrip(model)
    assert len(weights) == 17
    out = tmp_path / "out.onnx"
    save_model(rebuilt, out)
    rng = np.random.default_rng(3)
    feeds = {"input": rng.uniform(-1, 1, (1, 576)).astype(np.float32),
             "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, dtype=np.int64)}
    _assert_same_outputs(_session(folder / "m.onnx"), _session(out), feeds)


# --------------------------------------------------------------------------------------------------
# dtypes and storage fields, bit-exact


def _dtype_zoo() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model whose initializers cover every float type in raw_data and in typed fields."""
    rng = np.random.default_rng(4)
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], dtype=np.float32)
    f32 = np.concatenate([special, rng.normal(size=6).astype(np.float32)]).reshape(3, 4)
    f32[0, 0] = f32[1, 0] = np.array([0x7F800001], np.uint32).view(np.float32)[0]  # signalling NaNs
    f16 = rng.normal(size=(2, 3)).astype(np.float16)
    f16.view(np.uint16)[0, 0] = 0x7C01  # fp16 NaN with a payload
    bf16 = rng.integers(0, 0x10000, size=(5,), dtype=np.uint16)
    f64 = rng.normal(size=(2, 2))
    f64.view(np.uint64)[0, 0] = 0x7FF0000000000001
    expected = {"f32_raw": f32, "f32_typed": f32[1:].copy(), "f16_raw": f16, "f16_typed": f16[:1].copy(),
                "bf16_raw": bf16, "bf16_typed": bf16[:3].copy(), "f64_raw": f64, "f64_typed": f64.T.copy(),
                "empty": np.zeros((0, 3), np.float32), "scalar": np.array(1.5, np.float32)}
    inits = [
        _raw_tensor("f32_raw", f32, TensorProto.FLOAT),
        _raw_tensor("f16_raw", f16, TensorProto.FLOAT16),
        _raw_tensor("bf16_raw", bf16, TensorProto.BFLOAT16),
        _raw_tensor("f64_raw", f64, TensorProto.DOUBLE),
        _raw_tensor("scalar", expected["scalar"], TensorProto.FLOAT),
        TensorProto(name="empty", data_type=TensorProto.FLOAT, dims=[0, 3]),
        helper.make_tensor("shape", TensorProto.INT64, [2], [3, 4]),
        helper.make_tensor("i8", TensorProto.INT8, [3], [1, -2, 3]),
    ]
    t = TensorProto(name="f32_typed", data_type=TensorProto.FLOAT, dims=[2, 4], doc_string="typed floats")
    t.MergeFromString(b"\x22\x20" + expected["f32_typed"].astype("<f4").tobytes())  # packed float_data, exact bits
    inits.append(t)
    t = TensorProto(name="f16_typed", data_type=TensorProto.FLOAT16, dims=[1, 3])
    t.int32_data.extend(expected["f16_typed"].view(np.uint16).ravel().tolist())
    inits.append(t)
    t = TensorProto(name="bf16_typed", data_type=TensorProto.BFLOAT16, dims=[3])
    t.int32_data.extend(expected["bf16_typed"].tolist())
    inits.append(t)
    t = TensorProto(name="f64_typed", data_type=TensorProto.DOUBLE, dims=[2, 2])
    t.MergeFromString(b"\x52\x20" + expected["f64_typed"].astype("<f8").tobytes())  # packed double_data
    t.data_location = TensorProto.DEFAULT  # explicitly set: must survive
    entry = t.metadata_props.add()
    entry.key, entry.value = "note", "kept"
    inits.append(t)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    const = helper.make_node("Constant", [], ["c"], value=_raw_tensor("ignored", f32[:1], TensorProto.FLOAT))
    expected["c"] = f32[:1].copy()
    node = helper.make_node("Identity", ["c"], ["y"], doc_string="doc")
    model = _model([const, node], [], [out], inits, doc_string="zoo", producer_name="test")
    helper.set_model_props(model, {"k": "v"})
    return model, expected


def test_every_float_dtype_and_field_roundtrips_bit_exact():
    model, expected = _dtype_zoo()
    original, rebuilt, weights = _roundtrip(model)
    assert rebuilt.SerializeToString() == original
    got = {w.name: w for w in weights}
    assert set(got) == set(expected)
    for name, arr in expected.items():
        w = got[name]
        assert w.array.shape == arr.shape, name
        assert w.array.dtype.itemsize == arr.dtype.itemsize, name
        assert w.array.tobytes() == np.ascontiguousarray(arr).tobytes(), name  # same bits, NaN payloads too
    assert got["bf16_raw"].array.dtype == np.uint16 and got["bf16_raw"].onnx_dtype == TensorProto.BFLOAT16
    assert got["f16_raw"].array.dtype == np.float16 and got["f64_raw"].array.dtype == np.float64
    assert got["c"].origin == "constant" and got["f32_raw"].origin == "initializer"


def test_non_float_tensors_stay_in_the_graph():
    model, _ = _dtype_zoo()
    blob, weights = extract_weights(model)
    skeleton = onnx.ModelProto.FromString(blob)
    kept = {t.name: t for t in skeleton.graph.initializer if t.data_location != TensorProto.EXTERNAL}
    assert set(kept) == {"shape", "i8"}
    assert list(onnx.numpy_helper.to_array(kept["shape"])) == [3, 4]
    assert "shape" not in {w.name for w in weights}


_FLOAT_CASES = st.sampled_from([(TensorProto.FLOAT, "<u4"), (TensorProto.FLOAT16, "<u2"),
                                (TensorProto.BFLOAT16, "<u2"), (TensorProto.DOUBLE, "<u8")])


@settings(max_examples=60, deadline=None)
@given(case=_FLOAT_CASES, shape=st.lists(st.integers(0, 4), max_size=3), typed=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_property_any_bits_roundtrip(case, shape, typed, seed):
    onnx_dtype, bits_dtype = case
    np_dtype = onnx_ingest.FLOAT_DTYPES[onnx_dtype][0]
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, np.iinfo(bits_dtype).max, size=shape, dtype=bits_dtype, endpoint=True)
    arr = bits.view(np_dtype)
    if typed and arr.size:
        t = TensorProto(name="w", data_type=onnx_dtype, dims=shape)
        if onnx_dtype in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            t.int32_data.extend(bits.ravel().tolist())
        else:
            field = onnx_ingest.FLOAT_DTYPES[onnx_dtype][1]
            number = TensorProto.DESCRIPTOR.fields_by_name[field].number
            payload = arr.tobytes()
            t.MergeFromString(bytes([number << 3 | 2]) + onnx_ingest.encode_varint(len(payload)) + payload)
    else:
        t = _raw_tensor("w", arr, onnx_dtype)
    model = _model([], [], [helper.make_tensor_value_info("w", onnx_dtype, shape)], [t])
    original, rebuilt, weights = _roundtrip(model)
    assert rebuilt.SerializeToString() == original
    assert weights[0].array.tobytes() == arr.tobytes()


# --------------------------------------------------------------------------------------------------
# weight kinds


def _kind_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)

    def init(name, *shape):
        return onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["b1"]),
        helper.make_node("Flatten", ["b1"], ["f1"]),
        helper.make_node("Gemm", ["f1", "gemm_w", "gemm_b"], ["g1"], transB=1),
        helper.make_node("Transpose", ["mm_wt"], ["mm_w"], perm=[1, 0]),  # pass-through to MatMul
        helper.make_node("MatMul", ["g1", "mm_w"], ["m1"]),
        helper.make_node("Add", ["m1", "mm_bias"], ["m2"]),  # bias of a MatMul
        helper.make_node("Add", ["m2", "plain_add"], ["m3"]),  # not a bias: Add after Add
        helper.make_node("Unsqueeze", ["m3", "axes"], ["s1"]),
        helper.make_node("LSTM", ["s1", "lstm_w", "lstm_r", "lstm_b"], ["l1"], hidden_size=3),
        helper.make_node("Gather", ["emb", "ids"], ["e1"]),
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("cv", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["cond"], ["i1"],
                         then_branch=helper.make_graph(
                             [helper.make_node("Constant", [], ["sub_w"], value=onnx.numpy_helper.from_array(
                                 rng.normal(size=(2, 1, 1, 1)).astype(np.float32), "sub_w")),
                              helper.make_node("Conv", ["x", "sub_w"], ["t1"])],
                             "then", [], [_f32("t1", None)]),
                         else_branch=helper.make_graph(
                             [helper.make_node("Constant", [], ["conv_w"], value=onnx.numpy_helper.from_array(
                                 rng.normal(size=(2, 1, 1, 1)).astype(np.float32), "conv_w")),
                              helper.make_node("Mul", ["x", "conv_w"], ["t2"])],
                             "else", [], [_f32("t2", None)])),
    ]
    inits = [init("conv_w", 2, 1, 3, 3), init("conv_b", 2), init("bn_s", 2), init("bn_b", 2), init("bn_m", 2),
             init("bn_v", 2), init("gemm_w", 4, 32), init("gemm_b", 4), init("mm_wt", 5, 4), init("mm_bias", 5),
             init("plain_add", 5), init("lstm_w", 1, 12, 5), init("lstm_r", 1, 12, 3), init("lstm_b", 1, 24),
             init("emb", 10, 6), helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ids", TensorProto.INT64, [2], [1, 3])]
    inputs = [_f32("x", [1, 1, 4, 4])]
    outputs = [_f32("l1", None), _f32("e1", None), _f32("i1", None)]
    return _model(nodes, inputs, outputs, inits)


def test_weight_kinds_from_consumers():
    model = _kind_model()
    original, rebuilt, weights = _roundtrip(model)
    assert rebuilt.SerializeToString() == original
    kinds = {w.name: w.kind for w in weights}
    assert kinds == {
        "conv_w": "conv", "conv_b": "conv",
        "bn_s": "norm", "bn_b": "norm", "bn_m": "norm", "bn_v": "norm",
        "gemm_w": "fc", "gemm_b": "fc", "mm_wt": "fc", "mm_bias": "fc", "plain_add": "other",
        "lstm_w": "rnn", "lstm_r": "rnn", "lstm_b": "rnn", "emb": "embedding",
        "sub_w": "conv",
        "conv_w#1": "conv",  # a subgraph Constant reusing a main-graph name gets a suffix (kind by name)
    }
    by_name = {w.name: w for w in weights}
    assert by_name["sub_w"].origin == "subgraph" and by_name["conv_w"].origin == "initializer"
    assert by_name["mm_wt"].consumers == ("Transpose",)
    assert by_name["conv_w"].consumers == ("Conv", "Mul")
    # deterministic traversal: initializers, then nodes, subgraphs in attribute order (make_node sorts
    # attributes by name, so else_branch comes first)
    assert [w.name for w in weights][-2:] == ["conv_w#1", "sub_w"]


def test_function_constants_are_extracted():
    w = onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "fw")
    fn = helper.make_function("local", "Dense", ["a"], ["b"],
                              [helper.make_node("Constant", [], ["fw"], value=w),
                               helper.make_node("MatMul", ["a", "fw"], ["b"])],
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Dense", ["x"], ["y"], domain="local")], "g",
                              [_f32("x", [1, 2])], [_f32("y", [1, 3])])
    model = helper.make_model(graph, functions=[fn], ir_version=10,  # onnxruntime 1.31 reads IR <= 13
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    original, rebuilt, weights = _roundtrip(model)
    assert rebuilt.SerializeToString() == original
    assert [(x.name, x.kind, x.origin) for x in weights] == [("fw", "fc", "function")]
    feeds = {"x": np.array([[1.0, 2.0]], np.float32)}
    _assert_same_outputs(_session(onnx.ModelProto.FromString(original)), _session(rebuilt), feeds)


# --------------------------------------------------------------------------------------------------
# hostile input files


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"not found"):
        load_model(tmp_path / "nope.onnx")


def test_directory(tmp_path):
    with pytest.raises(InputError, match=r"not a regular file"):
        load_model(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(InputError, match=r"e\.onnx.*is empty"):
        load_model(tmp_path / "e.onnx")


@pytest.mark.parametrize("content", [b"hello, this is text\n", b"PK\x03\x04" + bytes(60), b"\x00" * 16,
                                     b"\x08\x07"])  # the last one parses (ir_version=7) but has no graph
def test_not_an_onnx_model(tmp_path, content):
    (tmp_path / "t.onnx").write_bytes(content)
    with pytest.raises(InputError, match=r"t\.onnx.*not an ONNX model"):
        load_model(tmp_path / "t.onnx")


def _external_model(folder: Path, location: str, *, length: int | None = None) -> Path:
    """A model in ``folder`` whose initializer 'w' (4 floats, 16 bytes) lives at ``location``."""
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(16 if length is None else length))):
        e = t.external_data.add()
        e.key, e.value = key, value
    model = _model([helper.make_node("Identity", ["w"], ["y"])], [], [_f32("y", [4])], [t])
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def spy_open(monkeypatch):
    """Record every path onnx_ingest opens."""
    opened: list[str] = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(onnx_ingest, "open", spy, raising=False)
    return opened


@pytest.fixture
def secret(tmp_path):
    """A file outside the model's folder that must never be read."""
    p = tmp_path / "secret.bin"
    p.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    return p


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    return d


def _assert_nothing_outside(opened, folder):
    real = os.path.realpath(folder)
    assert opened, "the model file itself should have been opened"
    assert all(os.path.commonpath([real, p]) == real for p in opened), opened


def test_external_data_ok(model_dir, spy_open):
    (model_dir / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = load_model(_external_model(model_dir, "w.bin"))
    t = model.graph.initializer[0]
    assert t.data_location == TensorProto.DEFAULT and not t.HasField("data_location") and not t.external_data
    assert onnx.numpy_helper.to_array(t).tolist() == [0, 1, 2, 3]
    _assert_nothing_outside(spy_open, model_dir)


def test_external_data_missing(model_dir, spy_open):
    with pytest.raises(InputError, match=r"tensor 'w'.*'w\.bin'.*not found"):
        load_model(_external_model(model_dir, "w.bin"))


def test_external_data_short(model_dir, spy_open):
    (model_dir / "w.bin").write_bytes(bytes(10))
    with pytest.raises(InputError, match=r"tensor 'w'.*w\.bin.*10 bytes, shorter than .* = 16"):
        load_model(_external_model(model_dir, "w.bin"))


def test_external_data_length_disagrees_with_dims(model_dir, spy_open):
    (model_dir / "w.bin").write_bytes(bytes(32))
    with pytest.raises(InputError, match=r"tensor 'w'.*length 32 bytes.*need 16"):
        load_model(_external_model(model_dir, "w.bin", length=32))


def test_external_data_dotdot(model_dir, secret, spy_open):
    with pytest.raises(InputError, match=r"tensor 'w'.*'\.\./secret\.bin'.*'\.\.'"):
        load_model(_external_model(model_dir, "../secret.bin"))
    _assert_nothing_outside(spy_open, model_dir)


def test_external_data_dotdot_hidden_in_path(model_dir, secret, spy_open):
    (model_dir / "sub").mkdir()
    with pytest.raises(InputError, match=r"tensor 'w'.*'\.\."):
        load_model(_external_model(model_dir, "sub/../../secret.bin"))
    _assert_nothing_outside(spy_open, model_dir)


def test_external_data_absolute(model_dir, secret, spy_open):
    with pytest.raises(InputError, match=r"tensor 'w'.*secret\.bin.*absolute path"):
        load_model(_external_model(model_dir, str(secret)))
    _assert_nothing_outside(spy_open, model_dir)


def test_external_data_symlink_outside(model_dir, secret, spy_open):
    (model_dir / "w.bin").symlink_to(secret)
    with pytest.raises(InputError, match=r"tensor 'w'.*'w\.bin'.*outside the model's folder"):
        load_model(_external_model(model_dir, "w.bin"))
    _assert_nothing_outside(spy_open, model_dir)


def test_external_data_symlinked_folder_outside(model_dir, tmp_path, secret, spy_open):
    (model_dir / "link").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(InputError, match=r"outside the model's folder"):
        load_model(_external_model(model_dir, "link/secret.bin"))
    _assert_nothing_outside(spy_open, model_dir)


def test_external_data_symlink_inside_is_fine(model_dir, spy_open):
    (model_dir / "real.bin").write_bytes(np.ones(4, dtype=np.float32).tobytes())
    (model_dir / "w.bin").symlink_to(model_dir / "real.bin")
    model = load_model(_external_model(model_dir, "w.bin"))
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).tolist() == [1, 1, 1, 1]


def test_external_data_not_loaded_cannot_be_extracted(model_dir):
    model = load_model(_external_model(model_dir, "w.bin"), load_external=False)  # nothing read: no error yet
    assert model.graph.initializer[0].data_location == TensorProto.EXTERNAL
    with pytest.raises(InputError, match=r"tensor 'w'.*external file.*load_external=True"):
        extract_weights(model)


def test_bad_inline_data_is_refused():
    good = TensorProto(name="a", data_type=TensorProto.FLOAT, dims=[1], raw_data=bytes(4))
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], raw_data=bytes(12))
    model = _model([], [], [_f32("w", [4])], [good, t])
    before = model.SerializeToString()
    with pytest.raises(InputError, match=r"tensor 'w'.*raw_data is 12 bytes.*need 16"):
        extract_weights(model)
    assert model.SerializeToString() == before  # nothing was taken out
    t = TensorProto(name="h", data_type=TensorProto.FLOAT16, dims=[1], int32_data=[70000])
    with pytest.raises(InputError, match=r"tensor 'h'.*16-bit range"):
        extract_weights(_model([], [], [_f32("h", [1])], [t]))


# --------------------------------------------------------------------------------------------------
# rebuild errors


@pytest.fixture
def small():
    model, _ = _dtype_zoo()
    blob, weights = extract_weights(model)
    return blob, {w.name: w.array for w in weights}


def test_rebuild_garbage_blob():
    with pytest.raises(CorruptError, match=r"not an ONNX ModelProto"):
        rebuild(b"\xff\xff\xff garbage", {})
    with pytest.raises(CorruptError, match=r"holds no graph"):
        rebuild(b"", {})


def test_rebuild_missing_weight(small):
    blob, arrays = small
    del arrays["f16_raw"]
    with pytest.raises(CorruptError, match=r"slot 'f16_raw'.*no weight"):
        rebuild(blob, arrays)


def test_rebuild_unused_weight(small):
    blob, arrays = small
    arrays["stray"] = np.zeros(3, np.float32)
    with pytest.raises(CorruptError, match=r"1 weight\(s\) match no slot.*'stray'"):
        rebuild(blob, arrays)


def test_rebuild_shape_mismatch(small):
    blob, arrays = small
    arrays["f32_raw"] = arrays["f32_raw"].reshape(4, 3)
    with pytest.raises(CorruptError, match=r"weight 'f32_raw'.*shape \(4, 3\).*dims \[3, 4\]"):
        rebuild(blob, arrays)


def test_rebuild_dtype_mismatch(small):
    blob, arrays = small
    arrays["f16_raw"] = arrays["f16_raw"].astype(np.float32)
    with pytest.raises(CorruptError, match=r"weight 'f16_raw'.*float32.*FLOAT16"):
        rebuild(blob, arrays)


def test_rebuild_accepts_big_endian_arrays(small):
    blob, arrays = small
    expected = rebuild(blob, arrays).SerializeToString()
    arrays = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in arrays.items()}
    assert rebuild(blob, arrays).SerializeToString() == expected


def test_rebuild_refuses_real_external_reference(small):
    blob, arrays = small
    model = onnx.ModelProto.FromString(blob)
    model.graph.initializer[0].external_data[0].value = "../../etc/passwd"
    with pytest.raises(CorruptError, match=r"refers to external data '\.\./\.\./etc/passwd'"):
        rebuild(model.SerializeToString(), arrays)


def test_rebuild_duplicate_slot(small):
    blob, arrays = small
    model = onnx.ModelProto.FromString(blob)
    model.graph.initializer.add().CopyFrom(model.graph.initializer[0])
    with pytest.raises(CorruptError, match=r"named by two slots"):
        rebuild(model.SerializeToString(), arrays)


# --------------------------------------------------------------------------------------------------
# save_model


def test_save_model_single_file(tmp_path):
    model, _ = _dtype_zoo()
    save_model(model, tmp_path / "a.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == model.SerializeToString()
    assert sorted(os.listdir(tmp_path)) == ["a.onnx"]


def test_save_model_failure_leaves_nothing(tmp_path, monkeypatch):
    model, _ = _dtype_zoo()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx_rebuild.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "a.onnx")
    assert os.listdir(tmp_path) == []


def test_save_model_missing_folder(tmp_path):
    model, _ = _dtype_zoo()
    with pytest.raises(InputError, match=r"does not exist"):
        save_model(model, tmp_path / "no" / "a.onnx")


@pytest.mark.realmodel
def test_save_model_external_data_when_too_big(tmp_path):
    model = load_model(model_path("silero-vad"))  # weights in Constant nodes inside If branches
    before = model.SerializeToString()
    target = tmp_path / "big.onnx"
    save_model(model, target, max_single_file_bytes=100_000)
    assert model.SerializeToString() == before  # the caller's model is unchanged
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert target.stat().st_size < 200_000 < (tmp_path / "big.onnx.data").stat().st_size
    assert load_model(target).SerializeToString() == before
    rng = np.random.default_rng(6)
    feeds = {"input": rng.uniform(-1, 1, (1, 576)).astype(np.float32),
             "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, dtype=np.int64)}
    _assert_same_outputs(_session(onnx.ModelProto.FromString(before)), _session(target), feeds)


def test_save_model_external_failure_leaves_nothing(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    w = onnx.numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "w")
    model = _model([helper.make_node("Identity", ["w"], ["y"])], [], [_f32("y", [64, 64])], [w])
    before = model.SerializeToString()
    calls = []
    real_replace = os.replace

    def replace_then_fail(src, dst):  # the data file lands, then the model file fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(onnx_rebuild.os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "m.onnx", max_single_file_bytes=1000)
    assert os.listdir(tmp_path) == []
    assert model.SerializeToString() == before


def test_save_model_external_limit(tmp_path, monkeypatch):
    model, _ = _dtype_zoo()
    monkeypatch.setattr(onnx_rebuild, "PROTOBUF_LIMIT_BYTES", 10)
    with pytest.raises(LimitError, match=r"over the protobuf limit of 10 bytes"):
        save_model(model, tmp_path / "m.onnx", max_single_file_bytes=10)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# scan_model and write_model: the same results as the in-memory path, one tensor at a time


@pytest.mark.realmodel
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG_MODELS else n
                                  for n in MODEL_NAMES])
def test_scan_model_matches_extract_weights(name):
    path = model_path(name)
    blob, weights = extract_weights(load_model(path))
    scanned = onnx_ingest.scan_model(path)
    assert scanned.graph == blob
    assert scanned.original_bytes == path.stat().st_size
    assert [w.name for w in scanned.weights] == [w.name for w in weights]
    for w, ref in zip(weights, scanned.weights):
        arr = ref.load()
        assert (ref.kind, ref.consumers, ref.origin, ref.onnx_dtype) == (w.kind, w.consumers, w.origin, w.onnx_dtype)
        assert arr.dtype == w.array.dtype and arr.shape == w.array.shape and arr.tobytes() == w.array.tobytes()
        assert not arr.flags.writeable


def _write_both(tmp_path, blob, weights, limit):
    """write_model's file(s) and save_model(rebuild(...))'s, as {name: bytes} per folder."""
    arrays = {w.name: w.array for w in weights}
    specs = {n: onnx_rebuild.SlotSpec(a.shape, a.dtype) for n, a in arrays.items()}
    decoded = []

    def decode(name):
        decoded.append(name)
        return arrays[name]

    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    onnx_rebuild.write_model(blob, specs, decode, tmp_path / "new" / "m.onnx", max_single_file_bytes=limit)
    save_model(rebuild(blob, arrays), tmp_path / "old" / "m.onnx", max_single_file_bytes=limit)
    assert sorted(decoded) == sorted(arrays)  # each weight decoded exactly once
    return ({p.name: p.read_bytes() for p in (tmp_path / d).iterdir()} for d in ("new", "old"))


@pytest.mark.realmodel
@pytest.mark.parametrize("limit", [onnx_rebuild.PROTOBUF_LIMIT_BYTES, 100_000], ids=["one-file", "external"])
@pytest.mark.parametrize("name", ["silero-vad", "ppocr-cls", "centerface"])
def test_write_model_same_bytes_as_save_model(tmp_path, name, limit):
    blob, weights = extract_weights(load_model(model_path(name)))
    new, old = _write_both(tmp_path, blob, weights, limit)
    assert new == old
    assert sorted(new) == (["m.onnx"] if limit > 100_000 else ["m.onnx", "m.onnx.data"])


def test_write_model_every_dtype_and_field(tmp_path):
    model, _ = _dtype_zoo()
    blob, weights = extract_weights(model)
    new, old = _write_both(tmp_path, blob, weights, onnx_rebuild.PROTOBUF_LIMIT_BYTES)
    assert new == old


def test_write_model_checks_before_writing(small, tmp_path):
    blob, arrays = small
    specs = {n: onnx_rebuild.SlotSpec(a.shape, a.dtype) for n, a in arrays.items()}
    first = next(iter(arrays))
    bad = dict(specs, **{first: onnx_rebuild.SlotSpec((1, 2, 3), arrays[first].dtype)})
    with pytest.raises(CorruptError, match=r"shape"):
        onnx_rebuild.write_model(blob, bad, lambda n: None, tmp_path / "m.onnx")
    wrong = {n: a.reshape(-1)[:0] for n, a in arrays.items()}  # decodes to another shape than its record says
    with pytest.raises(CorruptError, match=r"decoded to"):
        onnx_rebuild.write_model(blob, specs, wrong.__getitem__, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Models that lie about where their tensors are (attribute types, data_location)


def _lying_attribute_model(field: str) -> onnx.ModelProto:
    """A model with an attribute declared INT that also holds a tensor (``t``, ``tensors`` or a graph ``g``)
    whose data is external at '../secret.bin'. onnx.load_external_data follows ``t`` and ``tensors``."""
    t = TensorProto(name="hidden", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = key, value
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [_f32("x", [4])], [_f32("y", [4])])
    a = model.graph.node[0].attribute.add()
    a.name, a.type, a.i = "lie", onnx.AttributeProto.INT, 1
    if field == "t":
        a.t.CopyFrom(t)
    elif field == "tensors":
        a.tensors.add().CopyFrom(t)
    else:
        a.g.CopyFrom(helper.make_graph([], "sub", [], [], initializer=[t]))
    return model


@pytest.mark.parametrize("field", ["t", "tensors", "g"])
def test_external_reference_behind_a_lying_attribute_type(model_dir, secret, spy_open, field):
    (model_dir / "m.onnx").write_bytes(_lying_attribute_model(field).SerializeToString())
    for read in (load_model, onnx_ingest.scan_model):
        with pytest.raises(InputError, match=r"'hidden'.*'\.\.'"):
            read(model_dir / "m.onnx")
    _assert_nothing_outside(spy_open, model_dir)


def test_function_attribute_default_with_external_data_is_checked(model_dir, secret, spy_open):
    model = _lying_attribute_model("t")
    a = model.graph.node[0].attribute[0]
    f = helper.make_function("local", "F", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                             [helper.make_opsetid("", 17)])
    f.attribute_proto.add().CopyFrom(a)
    del model.graph.node[0].attribute[:]
    model.functions.append(f)
    (model_dir / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=r"'hidden'.*'\.\.'"):
        onnx_ingest.scan_model(model_dir / "m.onnx")
    _assert_nothing_outside(spy_open, model_dir)


@pytest.mark.parametrize("field", ["t", "tensors", "g"])
def test_rebuild_refuses_external_reference_behind_a_lying_attribute_type(tmp_path, field):
    blob = _lying_attribute_model(field).SerializeToString()
    with pytest.raises(CorruptError, match=r"'hidden' refers to external data '\.\./secret\.bin'"):
        rebuild(blob, {})
    with pytest.raises(CorruptError, match=r"'hidden' refers to external data '\.\./secret\.bin'"):
        onnx_rebuild.write_model(blob, {}, lambda n: None, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_stray_external_data_entries_on_an_inline_weight_are_refused():
    """data_location DEFAULT with external_data entries: ignored by onnx, but the slot could not be read back."""
    w = _raw_tensor("w", np.arange(4, dtype=np.float32), TensorProto.FLOAT)
    e = w.external_data.add()
    e.key, e.value = "location", "elsewhere.bin"
    model = _model([helper.make_node("Identity", ["w"], ["y"])], [], [_f32("y", [4])], [w])
    with pytest.raises(InputError, match=r"'w' has 1 external_data entries but keeps its data inline"):
        extract_weights(model)


def test_scan_model_reads_external_weights_on_demand(model_dir, spy_open):
    (model_dir / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    path = _external_model(model_dir, "w.bin")
    scanned = onnx_ingest.scan_model(path)
    assert sum(p.endswith("w.bin") for p in spy_open) == 0  # checked (stat), not read yet
    assert np.array_equal(scanned.weights[0].load(), np.arange(4, dtype=np.float32))
    assert scanned.original_bytes == path.stat().st_size + 16
    blob, weights = extract_weights(load_model(path))
    assert scanned.graph == blob
    _assert_nothing_outside(spy_open, model_dir)

"""Whole-file round trips: decode(encode(x)) is exactly the encoder's reference, for any tensor and setting."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dcformat.codec import CompressSettings, TensorInput, decode_tensor, encode_tensor, read_dcz, write_dcz
from dcformat.constants import DType, Layout
from dcformat.errors import InputError

FLOATS = [np.float32, np.float16, np.float64, "bfloat16"]


def _array(rng, shape, dtype, outliers):
    x = rng.normal(0, 0.1, shape)
    if outliers and x.size > 4:
        x.flat[rng.integers(0, x.size, 3)] *= 300
    if dtype == "bfloat16":
        return x.astype(ml_dtypes.bfloat16).view(np.uint16), DType.BFLOAT16
    return x.astype(dtype), None


@st.composite
def tensor_inputs(draw, name):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(FLOATS + [np.int64, np.uint8, np.bool_]))
    if dtype in (np.int64, np.uint8, np.bool_):
        return TensorInput(name, rng.integers(0, 2, shape).astype(dtype), CompressSettings())
    arr, tag = _array(rng, shape, dtype, draw(st.booleans()))
    if draw(st.booleans()) and arr.size:  # zeros already present (a model pruned elsewhere)
        arr.flat[rng.integers(0, arr.size, arr.size // 3)] = 0
    rule = draw(st.sampled_from(["none", "sparsity", "quality", "threshold"]))
    kw = {
        "none": {},
        "sparsity": {"sparsity": draw(st.floats(0, 1))},
        "quality": {"quality": draw(st.floats(0, 3))},
        "threshold": {"threshold": draw(st.floats(0, 0.3))},
    }[rule]
    s = CompressSettings(
        bits=draw(st.integers(1, 10)),
        index_bits=draw(st.integers(1, 9)),
        init=draw(st.sampled_from(["linear", "density", "random"])),
        layout=draw(st.sampled_from(["auto", "dense", "sparse"])),
        **kw,
    )
    return TensorInput(name, arr, draw(st.sampled_from([s, s, None])), dtype=tag)


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=5, unique=True).flatmap(
    lambda ids: st.tuples(*[tensor_inputs(f"t{i}") for i in ids])))
@settings(max_examples=60, deadline=None)
def test_file_round_trip(tmp_path_factory, inputs):
    path = tmp_path_factory.mktemp("rt") / "m.dcz"
    refs = {}
    write_dcz(path, inputs, graph=b"\x00graph", metadata={"k": "v"}, on_tensor=lambda e: refs.update({e.entry.name: e}))
    contents = read_dcz(path)
    assert contents.graph == b"\x00graph" and contents.metadata == {"k": "v"}
    for t in inputs:
        enc = refs[t.name]
        out = contents.tensors[t.name]
        assert out.dtype == enc.reference.dtype and out.shape == np.shape(t.array)
        assert out.tobytes() == enc.reference.tobytes()  # bit for bit
        src = np.asarray(t.array)
        if t.settings is None or enc.entry.layout == Layout.RAW:
            assert out.tobytes() == np.asarray(src, order="C").tobytes()
        else:
            # zeros stay zero, and the codebook respects the bit width
            as_float = (out.astype(np.uint32) << 16).view(np.float32) if t.dtype == DType.BFLOAT16 else out
            src_float = (src.astype(np.uint32) << 16).view(np.float32) if t.dtype == DType.BFLOAT16 else src
            assert np.all(as_float[src_float == 0] == 0)
            assert enc.entry.codebook_size <= 1 << t.settings.bits


def test_few_distinct_values_come_back_exactly():
    x = np.random.default_rng(0).choice(np.array([-1.5, 0.0, 0.1, 2.0], np.float32), size=(50, 50))
    enc = encode_tensor(TensorInput("w", x, CompressSettings(bits=2)))
    assert enc.entry.layout != Layout.RAW
    np.testing.assert_array_equal(decode_tensor(enc.entry, list(enc.payloads)), x)


@pytest.mark.parametrize("dtype", FLOATS)
def test_codebook_keeps_dtype(dtype):
    arr, tag = _array(np.random.default_rng(1), (64, 64), dtype, True)
    enc = encode_tensor(TensorInput("w", arr, CompressSettings(bits=4), dtype=tag))
    assert enc.entry.dtype == (tag or DType[np.dtype(dtype).name.upper()])
    assert enc.entry.codebook_size <= 16 and enc.entry.layout == Layout.DENSE
    out = decode_tensor(enc.entry, list(enc.payloads))
    assert out.dtype == arr.dtype and out.tobytes() == enc.reference.tobytes()


def test_ml_dtypes_bfloat16_accepted():
    x = np.random.default_rng(2).normal(size=(32, 32)).astype(ml_dtypes.bfloat16)
    enc = encode_tensor(TensorInput("w", x, CompressSettings(bits=3)))
    assert enc.entry.dtype == DType.BFLOAT16


@pytest.mark.parametrize(
    "array, note",
    [
        (np.zeros((0, 5), np.float32), "empty"),
        (np.float32(1.5), "smaller"),
        (np.array([1.0, np.inf] * 100, np.float32), "NaN or Inf"),
        (np.array([np.nan] * 200, np.float16), "NaN or Inf"),
        (np.arange(100), "not a float"),
    ],
)
def test_stored_raw_with_reason(array, note):
    enc = encode_tensor(TensorInput("w", array, CompressSettings()))
    assert enc.entry.layout == Layout.RAW and note in enc.note
    out = decode_tensor(enc.entry, list(enc.payloads))
    assert out.tobytes() == np.asarray(array, order="C").tobytes() and out.shape == np.shape(array)


def test_pruned_tensor_keeps_mask_and_sparsity():
    x = np.random.default_rng(3).normal(size=(300, 784)).astype(np.float32)
    x[:, :100] = 0
    enc = encode_tensor(TensorInput("fc", x, CompressSettings(bits=5, sparsity=0.9, index_bits=5)))
    out = decode_tensor(enc.entry, list(enc.payloads))
    assert enc.entry.layout == Layout.SPARSE
    assert np.all(out[:, :100] == 0)
    assert enc.entry.zeros == round(0.9 * x.size) == out.size - np.count_nonzero(out)


def test_big_endian_input_is_stored_little_endian():
    x = np.arange(10, dtype=">f4")
    enc = encode_tensor(TensorInput("w", x))
    np.testing.assert_array_equal(decode_tensor(enc.entry, list(enc.payloads)), x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 17}, "bits"),
        ({"index_bits": 0}, "index_bits"),
        ({"sparsity": 0.5, "quality": 1.0}, "at most one"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"init": "kmeans++"}, "init"),
        ({"layout": "csr"}, "layout"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(InputError, match=match):
        CompressSettings(**kwargs)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="name"):
        encode_tensor(TensorInput("", np.zeros(3, np.float32)))
    with pytest.raises(InputError, match="cannot be stored"):
        encode_tensor(TensorInput("s", np.array(["a"])))
    with pytest.raises(InputError, match="used twice"):
        write_dcz(tmp_path / "x.dcz", [TensorInput("a", np.zeros(2)), TensorInput("a", np.zeros(2))])
    assert not (tmp_path / "x.dcz").exists() and list(tmp_path.iterdir()) == []  # no partial output left

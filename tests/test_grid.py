"""GRID codebooks (format 1.1; two-axis grids 1.2): per-tensor, per-channel and two-axis uniform grids, round trips
and hostile payloads."""

import struct
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcformat import quantize
from dcformat.codec import CompressSettings, TensorInput, decode_tensor, encode_tensor, read_dcz, write_dcz
from dcformat.constants import GRID_MAX_LEVEL, Coding, Layout
from dcformat.errors import CorruptError, InputError


def _scaled(rng, shape, dtype=np.float32):
    """Weights whose first-axis channels span four decades (a BN-folded conv)."""
    x = rng.standard_normal(shape) * np.logspace(-2, 2, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    return x.astype(dtype)


def _roundtrip(x, s):
    enc = encode_tensor(TensorInput("w", x, s))
    out = decode_tensor(enc.entry, list(enc.payloads))
    assert out.dtype == enc.reference.dtype
    np.testing.assert_array_equal(out.view(np.uint8), enc.reference.view(np.uint8))
    return enc, out


#: What both grid round trips draw besides the shape: element type, per channel or not, pruning, layout, error.
GRID_CASES = dict(
    dtype=st.sampled_from([np.float32, np.float16, np.float64, ml_dtypes.bfloat16]),
    per_channel=st.booleans(),
    sparsity=st.sampled_from([None, 0.5, 0.95]),
    layout=st.sampled_from(["auto", "dense", "sparse"]),
    rel=st.sampled_from([1e-3, 3e-2, 0.3]),
)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple), seed=st.integers(0, 2**16), **GRID_CASES)
def test_grid_round_trip_is_bit_exact(shape, dtype, per_channel, sparsity, layout, rel, seed):
    x = _scaled(np.random.default_rng(seed), (8,) + shape, dtype)
    s = CompressSettings(quantizer="uniform", rel_error=rel, per_channel=per_channel, sparsity=sparsity, layout=layout)
    _roundtrip(x, s)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), data=st.data(), **GRID_CASES)
def test_two_axis_grid_round_trip_is_bit_exact(shape, dtype, per_channel, sparsity, layout, rel, data):
    x = _scaled(np.random.default_rng(data.draw(st.integers(0, 2**16))), (8,) + shape, dtype)
    axis = data.draw(st.integers(0, x.ndim - 1))
    steps = tuple(data.draw(st.lists(st.floats(0.01, 100.0), min_size=x.shape[axis], max_size=x.shape[axis])))
    s = CompressSettings(quantizer="uniform", rel_error=rel, per_channel=per_channel, sparsity=sparsity, layout=layout,
                         input_axis=axis, input_steps=steps)
    _roundtrip(x, s)


def test_input_steps_put_the_error_where_asked():
    # Columns (inputs) with 10x the step get ~10x the rounding error; rows keep their own scales (two axes).
    x = _scaled(np.random.default_rng(7), (16, 64))
    steps = np.where(np.arange(64) % 2, 10.0, 1.0)
    s = CompressSettings(quantizer="uniform", rel_error=0.01, per_channel=True, layout="dense", input_axis=1,
                         input_steps=tuple(steps))
    enc, out = _roundtrip(x, s)
    axis, axis2 = struct.unpack_from("<BB", enc.payloads[0])
    assert (axis, axis2) == (0, 2) and enc.entry.streams[0].length == 8 + 4 * (16 + 64)
    rel_err = np.abs(out.astype(np.float64) - x) / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True))
    ratio = rel_err[:, 1::2].mean() / rel_err[:, ::2].mean()
    assert 7 < ratio < 13
    # Per tensor, the input steps are the grid's one axis: no second scale vector.
    one = encode_tensor(TensorInput("w", x, CompressSettings(quantizer="uniform", rel_error=0.01, input_axis=0,
                                                             input_steps=(2.0,) * 16)))
    assert struct.unpack_from("<BB", one.payloads[0]) == (0, 0) and one.entry.streams[0].length == 8 + 4 * 16
    # Per channel, the channel axis is never the inputs' own: here the other end, axis 1.
    two = encode_tensor(TensorInput("w", x, CompressSettings(quantizer="uniform", rel_error=0.01, per_channel=True,
                                                             input_axis=0, input_steps=(2.0,) * 16)))
    assert struct.unpack_from("<BB", two.payloads[0]) == (1, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_axis=1), "go together"),
    (dict(input_axis=1, input_steps=(1.0, 0.0)), "positive finite"),
    (dict(input_axis=1, input_steps=(1.0, float("inf"))), "positive finite"),
    (dict(input_axis=-1, input_steps=(1.0,)), "outside"),
    (dict(input_axis=0, input_steps=(1.0,), quantizer="kmeans", rel_error=None), "uniform quantizer"),
])
def test_input_steps_settings_are_checked(kwargs, match):
    base = dict(quantizer="uniform", rel_error=0.01)
    with pytest.raises(InputError, match=match):
        CompressSettings(**{**base, **kwargs})


def test_input_steps_of_the_wrong_length_are_refused():
    s = CompressSettings(quantizer="uniform", rel_error=0.01, input_axis=1, input_steps=(1.0, 2.0))
    with pytest.raises(InputError, match="2 input steps for axis 1 of shape"):
        encode_tensor(TensorInput("w", np.ones((4, 3), np.float32), s))


def test_per_channel_keeps_every_channel_at_its_error():
    x = _scaled(np.random.default_rng(1), (32, 16, 3, 3))
    s = CompressSettings(quantizer="uniform", rel_error=0.01, per_channel=True, layout="dense")
    enc, out = _roundtrip(x, s)
    err = np.sqrt(np.mean((out.astype(np.float64) - x) ** 2, axis=(1, 2, 3)))
    rel = err / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=(1, 2, 3)))
    assert rel.max() < 0.011
    # One grid fine enough for the weakest channel spends many more bits on the strong ones (1.49x here, with its
    # 40k-level alphabet in a binned stream; 2.0x when a Huffman or rANS table listed every level).
    finest = float(np.frombuffer(enc.payloads[0], "<f4", offset=8).min())
    one = encode_tensor(TensorInput("w", x, replace(s, per_channel=False, step=finest)))
    assert one.entry.stored_bytes > 1.4 * enc.entry.stored_bytes


def test_per_channel_picks_the_varying_axis():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 24)) * np.logspace(-2, 1, 24)  # MatMul [in, out]: out channels last
    assert quantize.channel_axis(x) == 1
    assert quantize.channel_axis(x.T) == 0
    assert quantize.channel_axis(np.ones(7)) is None


def test_grid_codebook_is_small_and_levels_are_exact_multiples():
    x = _scaled(np.random.default_rng(3), (4, 256))
    enc, out = _roundtrip(x, CompressSettings(quantizer="uniform", rel_error=1e-3, per_channel=True))
    cb = enc.entry.streams[0]
    assert cb.coding == Coding.GRID and cb.length == 8 + 4 * 4
    axis, q_min = struct.unpack_from("<B3xi", enc.payloads[0])
    scales = np.frombuffer(enc.payloads[0], "<f4", offset=8)
    q = np.rint(out / scales[:, None])
    assert axis == 0 and np.array_equal(out, q.astype(np.float32) * scales[:, None]) and q.min() >= q_min


def test_grid_zero_levels_leave_the_sparse_stream():
    # A coarse grid rounds most small weights to level 0: SPARSE stores only the nonzero levels.
    x = np.random.default_rng(4).laplace(size=(64, 64)).astype(np.float32) ** 3
    enc, out = _roundtrip(x, CompressSettings(quantizer="uniform", step=2.0, layout="sparse"))
    assert enc.entry.layout == Layout.SPARSE and enc.entry.nnz == np.count_nonzero(out)


def test_grid_widens_a_step_too_fine_for_16_bit_codes():
    x = np.linspace(-1, 1, 100_000).astype(np.float32)
    enc, out = _roundtrip(x, CompressSettings(quantizer="uniform", step=1e-7))
    assert enc.entry.codebook_size <= 65536


def test_grid_file_round_trip(tmp_path):
    x = _scaled(np.random.default_rng(5), (8, 4, 3, 3))
    s = CompressSettings(quantizer="uniform", rel_error=0.01, per_channel=True)
    write_dcz(tmp_path / "g.dcz", [TensorInput("w", x, s)])
    ref = encode_tensor(TensorInput("w", x, s)).reference
    np.testing.assert_array_equal(read_dcz(tmp_path / "g.dcz").tensors["w"], ref)


# --- hostile GRID payloads: one case per reader check ----------------------------------------------------


def _grid_case(layout="dense", dtype=np.float32):
    x = _scaled(np.random.default_rng(6), (4, 5, 3), dtype)
    s = CompressSettings(quantizer="uniform", rel_error=0.05, per_channel=True, sparsity=0.5 if layout == "sparse" else None, layout=layout)
    enc = encode_tensor(TensorInput("w", x, s))
    assert enc.entry.streams[0].coding == Coding.GRID
    return enc.entry, [bytearray(p) for p in enc.payloads]


def _poke(payload, fmt, offset, value):
    struct.pack_into(fmt, payload, offset, value)


HOSTILE = [
    ("reserved", lambda e, p: _poke(p[0], "<B", 2, 1), "reserved bytes are not zero"),
    ("axis_out_of_range", lambda e, p: _poke(p[0], "<B", 0, 3), "GRID axis 3 is not an axis"),
    ("axis_wrong_length", lambda e, p: _poke(p[0], "<B", 0, 1), "GRID codebook is 24 bytes, axes 1, 0 need 28"),
    ("scale_zero", lambda e, p: _poke(p[0], "<f", 12, 0.0), "scales must be finite and > 0"),
    ("scale_negative", lambda e, p: _poke(p[0], "<f", 8, -1.0), "scales must be finite and > 0"),
    ("scale_nan", lambda e, p: _poke(p[0], "<f", 8, float("nan")), "scales must be finite and > 0"),
    ("level_beyond_2_24", lambda e, p: _poke(p[0], "<i", 4, -GRID_MAX_LEVEL - 1), "exceed"),
    ("level_times_scale_overflows", lambda e, p: _poke(p[0], "<f", 8, 3e38), "overflows FLOAT32"),
]




def _grid2_case(layout="dense", dtype=np.float32):
    x = _scaled(np.random.default_rng(8), (4, 5, 3), dtype)
    s = CompressSettings(quantizer="uniform", rel_error=0.05, per_channel=True, sparsity=0.5 if layout == "sparse" else None,
                         layout=layout, input_axis=1, input_steps=(1.0, 2.0, 0.5, 1.0, 4.0))
    enc = encode_tensor(TensorInput("w", x, s))
    assert struct.unpack_from("<BB", enc.payloads[0]) == (0, 2)
    return enc.entry, [bytearray(p) for p in enc.payloads]


# Two-axis payload: 8-byte header, 4 scales (axis 0), then 5 second scales (axis 1) at offset 24.
HOSTILE_2 = [
    ("second_axis_same_as_axis", lambda e, p: _poke(p[0], "<B", 1, 1), "second axis 0 is not another axis"),
    ("second_axis_out_of_range", lambda e, p: _poke(p[0], "<B", 1, 4), "second axis 3 is not another axis"),
    ("second_axis_without_axis", lambda e, p: _poke(p[0], "<B", 0, 0xFF), "second axis 1 is not another axis"),
    ("two_axes_wrong_length", lambda e, p: _poke(p[0], "<B", 1, 3), "axes 0, 3 need 36"),
    ("scale2_zero", lambda e, p: _poke(p[0], "<f", 28, 0.0), "scales must be finite and > 0"),
    ("scale2_nan", lambda e, p: _poke(p[0], "<f", 24, float("nan")), "scales must be finite and > 0"),
    ("scale2_product_overflows", lambda e, p: _poke(p[0], "<f", 40, 3e38), "overflows FLOAT32"),
    ("first_product_overflows", lambda e, p: (_poke(p[0], "<f", 8, 3e38), [_poke(p[0], "<f", 24 + 4 * k, 1e-30)
                                                                            for k in range(5)]), "overflows FLOAT32"),
]


@pytest.mark.parametrize("name, mutate, match", HOSTILE_2, ids=[h[0] for h in HOSTILE_2])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_hostile_two_axis_grid_payload(name, mutate, match, layout):
    entry, payloads = _grid2_case(layout)
    mutate(entry, payloads)
    with pytest.raises(CorruptError, match=match):
        decode_tensor(entry, [bytes(p) for p in payloads])


@pytest.mark.parametrize("name, mutate, match", HOSTILE, ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_hostile_grid_payload(name, mutate, match, layout):
    entry, payloads = _grid_case(layout)
    mutate(entry, payloads)
    with pytest.raises(CorruptError, match=match):
        decode_tensor(entry, [bytes(p) for p in payloads])


def test_float16_grid_overflow_is_refused():
    entry, payloads = _grid_case("dense", np.float16)
    _poke(payloads[0], "<f", 8, 1e4)  # levels of a few tens times 1e4 exceed float16's 65504
    with pytest.raises(CorruptError, match="overflows FLOAT16"):
        decode_tensor(entry, [bytes(p) for p in payloads])


def test_grid_length_not_a_slice_count_is_refused_from_the_index(tmp_path):
    from dcformat.container import _check_plain_lengths

    entry, payloads = _grid_case()
    bad = replace(entry, streams=(replace(entry.streams[0], length=8 + 4 * 6),) + entry.streams[1:])
    with pytest.raises(CorruptError, match="holds no whole scale per slice"):
        _check_plain_lengths(bad)


# --- grids given with the tensor (the allocation's compensated rounding) ------------------------------------------


def test_given_grid_is_stored_exactly():
    x = _scaled(np.random.default_rng(9), (6, 10))
    g = quantize.make_grid(x, 0.05, 0, input_axis=1, input_steps=np.linspace(0.5, 2, 10))
    q = g.q.copy()
    q[0, :3] += 1  # not nearest rounding any more: only a given grid can say so
    s = CompressSettings(quantizer="uniform", rel_error=0.05)
    enc = encode_tensor(TensorInput("w", x, s, grid=g._replace(q=q)))
    out = decode_tensor(enc.entry, list(enc.payloads))
    want = quantize.grid_values(q, g.scales, g.axis, np.dtype(np.float32), g.scales2, g.axis2)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(enc.reference, want)


@pytest.mark.parametrize("change, match", [
    (lambda g: g._replace(q=g.q[:, :5]), "levels of shape"),
    (lambda g: g._replace(q=g.q + 0.5), "must be integers"),
    (lambda g: g._replace(q=g.q * 0 + GRID_MAX_LEVEL + 1), "must be integers within"),
    (lambda g: g._replace(scales=-g.scales), "positive and finite"),
    (lambda g: g._replace(scales2=g.scales2[:3]), "one per slice"),
    (lambda g: g._replace(axis2=0), "two different axes"),
    (lambda g: g._replace(axis=5), "not an axis"),
])
def test_given_grid_is_checked(change, match):
    x = _scaled(np.random.default_rng(10), (6, 10))
    g = quantize.make_grid(x, 0.05, 0, input_axis=1, input_steps=np.linspace(0.5, 2, 10))
    with pytest.raises(InputError, match=match):
        encode_tensor(TensorInput("w", x, CompressSettings(quantizer="uniform", rel_error=0.05), grid=change(g)))

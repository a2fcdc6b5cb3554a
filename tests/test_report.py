"""The per-layer breakdown behind ``dcz inspect``: the paper's columns, checked on small files whose sizes are
worked out by hand from the spec (codebook, canonical Huffman table, bitstream, relative-index entries)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dcformat.cli import main
from dcformat.codec import CompressSettings, TensorInput, write_dcz
from dcformat.report import breakdown, format_paper_table, format_table, to_json

N = 1000  # elements of the test tensor; 100 of them nonzero (10% kept)


def _sparse_tensor() -> np.ndarray:
    """100 nonzeros among 1000: values 1.0 and 2.0 (50 each), at gaps alternating 5 and 15."""
    gaps = np.tile([5, 15], 50)
    positions = np.cumsum(gaps) - 1  # the first gap is counted from position -1
    w = np.zeros(N, dtype=np.float32)
    w[positions] = np.tile([1.0, 2.0], 50)
    return w.reshape(10, 100)


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.dcz"
    rng = np.random.default_rng(0)
    tensors = [
        TensorInput("fc.weight", _sparse_tensor(), CompressSettings(bits=2, index_bits=4, layout="sparse")),
        # Dense: no zeros, 4 distinct values equally often -> 2-bit Huffman codes.
        TensorInput("dense.weight", np.tile(np.float32([-2, -1, 1, 2]), 250), CompressSettings(bits=2)),
        TensorInput("fc.bias", rng.standard_normal(10).astype(np.float32), None),
    ]
    write_dcz(path, tensors, graph=b"g" * 10, metadata={"dcz.original_bytes": "9000"})
    return path


def test_paper_columns_sparse_tensor_by_hand(small_file):
    r = {row.name: row for row in breakdown(small_file).rows}["fc.weight"]
    assert r.layout == "sparse" and r.params == N and r.nonzeros == 100
    assert r.kept == pytest.approx(0.10)
    assert (r.bits, r.index_bits, r.codebook_size) == (2, 4, 3)  # codebook {0, 1, 2}: 3 float32 = 12 bytes
    assert r.codebook_bytes == 12
    # Codes: two symbols, 50 each -> both 1-bit codewords: table 2 (header) + 4 (one count) + 2 (symbols) = 8
    # bytes, bitstream 100 bits = 13 bytes.
    assert r.codes_bytes == 8 + 13
    # Positions: gaps 5 and 15 fit 4 bits (M = 15), no fillers; again two symbols of 50 -> 8 + 13 bytes.
    assert r.positions_bytes == 8 + 13
    assert r.codes_bits_per_nonzero == pytest.approx(8 * 21 / 100)
    assert r.positions_bits_per_nonzero == pytest.approx(8 * 21 / 100)
    assert r.stored_bytes == 12 + 21 + 21
    assert r.rate == pytest.approx(54 / 4000)
    # Nominal widths, no Huffman: 100 codes x 2 bits = 25 bytes, 100 entries x 4 bits = 50 bytes, + codebook.
    assert r.fixed_bytes == 12 + 25 + 50
    assert r.fixed_rate == pytest.approx(87 / 4000)


def test_fillers_count_in_the_fixed_width_size(tmp_path):
    # Gap 7 with 2-bit indices (M = 3): entries 0, 0, 1 -- two fillers that cost index bits but carry no code.
    w = np.zeros(64, dtype=np.float32)
    w[[6, 13, 20, 27]] = [1.0, 2.0, 3.0, 1.0]
    path = tmp_path / "fill.dcz"
    write_dcz(path, [TensorInput("w", w, CompressSettings(bits=2, index_bits=2, layout="sparse"))])
    r = breakdown(path).rows[0]
    assert r.nonzeros == 4 and r.kept == pytest.approx(4 / 64)
    codebook = 4 * 4  # {0, 1, 2, 3}
    assert r.fixed_bytes == codebook + 1 + 3  # 4 codes x 2 bits = 1 byte; 12 entries x 2 bits = 3 bytes


def test_dense_and_raw_rows(small_file):
    rows = {row.name: row for row in breakdown(small_file).rows}
    d = rows["dense.weight"]
    assert d.layout == "dense" and d.kept == 1.0 and d.index_bits == 0 and d.positions_bytes == 0
    # 4 symbols of 250 -> 2-bit codewords: table 2 + 4 x 2 (counts for lengths 1, 2) + 4 symbols = 14 bytes,
    # bitstream 1000 x 2 bits = 250 bytes.
    assert d.codes_bytes == 14 + 250
    assert d.codes_bits_per_nonzero == pytest.approx(8 * 264 / 1000)
    assert d.fixed_bytes == 16 + 250 and d.rate == pytest.approx((16 + 264) / 4000)
    b = rows["fc.bias"]
    assert b.layout == "raw" and b.kept == 1.0 and b.rate == 1.0 and b.fixed_rate == 1.0


def test_paper_table_text(small_file):
    text = format_paper_table(breakdown(small_file))
    line = next(ln for ln in text.splitlines() if ln.startswith("fc.weight"))
    assert line.split() == ["fc.weight", "1,000", "10.0%", "2", "1.68", "4", "1.68", "2.17%", "1.35%"]
    dense = next(ln for ln in text.splitlines() if ln.startswith("dense.weight")).split()
    assert dense[3:7] == ["2", "2.11", "-", "-"]  # dense layout: no index columns
    assert "fc.bias" not in text and "raw tensors" in text
    total = next(ln for ln in text.splitlines() if ln.startswith("total (coded)")).split()
    assert total[2:4] == ["2,000", "55.0%"]  # (100 + 1000) of 2000 elements kept
    assert "fc.bias" in format_paper_table(breakdown(small_file), include_raw=True)


def test_json_keeps_old_fields_and_adds_paper_columns(small_file):
    doc = json.loads(to_json(breakdown(small_file)))
    row = {t["name"]: t for t in doc["tensors"]}["fc.weight"]
    for key in ("sparsity", "bits", "index_bits", "codes_bits_per_nonzero", "positions_bits_per_nonzero", "ratio",
                "stored_bytes", "kept", "rate", "fixed_bytes", "fixed_rate"):
        assert key in row
    assert row["sparsity"] == pytest.approx(0.9) and row["kept"] == pytest.approx(0.1)
    assert "fc.weight" in format_table(breakdown(small_file))  # the default table is unchanged beside it


def test_cli_inspect_paper(small_file):
    r = CliRunner().invoke(main, ["inspect", "--paper", str(small_file)])
    assert r.exit_code == 0, r.output
    assert "idx bits" in r.output and "fc.weight" in r.output and "rate P+Q" in r.output


def test_coding_names_each_coded_stream(small_file, tmp_path):
    rows = {row.name: row for row in breakdown(small_file).rows}
    assert rows["fc.weight"].coding == "huffman+huffman"  # codes, then positions: two 1-bit symbols each
    assert rows["dense.weight"].coding == "huffman" and rows["fc.bias"].coding == ""
    wide = tmp_path / "wide.dcz"  # a fine grid over heavy tails: tens of thousands of levels, a binned stream
    w = (np.random.default_rng(1).laplace(size=20_000) * 300).astype(np.float32)
    write_dcz(wide, [TensorInput("w", w, CompressSettings(quantizer="uniform", step=0.1))])
    b = breakdown(wide)
    assert b.rows[0].coding == "binned"
    table = format_table(b)
    assert " bin " in table.splitlines()[2] and "streams: 1 binned" in table
    assert json.loads(to_json(b))["tensors"][0]["coding"] == "binned"

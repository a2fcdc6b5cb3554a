"""spec/format.md and dcformat.constants agree: every enum table, and the limits."""

import re
from pathlib import Path

import pytest

from dcformat import constants as C

SPEC = (Path(__file__).resolve().parents[1] / "spec" / "format.md").read_text()


def _table_after(heading: str) -> list[list[str]]:
    """Rows (cells) of the first Markdown table after the heading line containing ``heading``."""
    start = SPEC.index(heading)
    rows = []
    for line in SPEC[start:].splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set(cells[0]) <= set("-"):
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # drop the header row


@pytest.mark.parametrize("enum", [C.SectionKind, C.DType, C.Layout, C.StreamKind, C.Coding, C.TensorKind])
def test_enum_tables_match(enum):
    rows = _table_after(f"(`{enum.__name__}`)")
    in_spec = {int(r[0]): r[1] for r in rows}
    assert in_spec == {m.value: m.name for m in enum}


def test_dtype_sizes_match():
    rows = _table_after("(`DType`)")
    for code, name, size, _ in rows:
        assert C.NUMPY_DTYPES[C.DType(int(code))].itemsize == int(size), name


def test_layout_streams_match():
    for code, name, streams, _ in _table_after("(`Layout`)"):
        assert tuple(s.strip() for s in streams.split(",")) == tuple(k.name for k in C.LAYOUT_STREAMS[C.Layout(int(code))])


def test_stream_codings_match():
    for code, name, _, codings in _table_after("(`StreamKind`)"):
        assert {c.strip() for c in codings.split(",")} == {c.name for c in C.STREAM_CODINGS[C.StreamKind(int(code))]}


def _value(text: str) -> int:
    m = re.fullmatch(r"2\^(\d+)", text)
    return 1 << int(m.group(1)) if m else int(text)


def test_limits_match():
    rows = _table_after("Fixed by the format") + _table_after("Reader limits")
    assert rows
    for name, value, _ in rows:
        assert getattr(C, name.strip("`")) == _value(value), name


def test_header_fields():
    rows = _table_after("## 2. Header")
    assert sum(int(r[1]) for r in rows) == C.HEADER_SIZE
    assert rows[0][4].startswith("`" + C.MAGIC.hex(" ").upper())
    rows = _table_after("## 3. Section table")
    assert sum(int(r[1]) for r in rows) == C.SECTION_ENTRY_SIZE


def test_max_code_length_in_huffman_table():
    assert f"0..{C.MAX_CODE_LENGTH} (`MAX_CODE_LENGTH`)" in SPEC

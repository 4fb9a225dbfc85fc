"""agora's GGUF reader gives what gguf-py's GGUFReader gives: every metadata value and every
tensor, byte for byte and shaped alike; and it refuses broken files with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from agora.models import gguf_file
from agora.models.gguf_file import GGUFFile, GGUFFormatError
from tests.models import gguf_py


def _assert_same_as_gguf_py(path) -> None:
    ours, theirs = GGUFFile(path), gguf_py.reader(path)  # (gguf-py's parse over the bytes in memory: faster)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        expected, value = theirs.fields[key].contents(), ours.metadata[key]
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif not isinstance(value, (str, bytes, int, float, bool)):
            value = list(value)  # string arrays, decoded one by one
        assert value == expected, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.qtype, a.dims, a.data.dtype, a.data.shape) == (
            b.tensor_type,
            tuple(b.shape.tolist()),
            b.data.dtype,
            b.data.shape,
        )
        assert np.array_equal(a.data, b.data), a.name


def test_dequantize_gives_gguf_py_values_for_every_block_type(monkeypatch) -> None:
    """The loader's dequantize is gguf-py's formula over bigger groups of rows: the same fp32 values, bit for bit,
    for every block type gguf-py reads, across groups and a ragged last one (random bytes: scales of every size,
    NaN and inf among them, which must come out alike too)."""
    from gguf import GGML_QUANT_SIZES, quants

    monkeypatch.setattr(gguf_file, "_DEQUANTIZE_GROUP", 1000)  # several groups, whatever the row width
    rng = np.random.default_rng(0)
    checked = []
    for qtype, (_, block_bytes) in GGML_QUANT_SIZES.items():
        if not hasattr(getattr(quants, qtype.name, None), "dequantize_rows"):
            continue
        data = rng.integers(0, 256, size=(37, 3 * block_bytes), dtype=np.uint8)
        with np.errstate(all="ignore"):
            want, got = quants.dequantize(data, qtype), gguf_file.dequantize(data, qtype)
        assert got.dtype == np.float32 and got.shape == want.shape, qtype.name
        assert np.array_equal(got, want, equal_nan=True), qtype.name
        checked.append(qtype.name)
    assert {"Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"} <= set(checked)
    vector = np.arange(7, dtype=np.float32)  # element types and 1-D tensors: gguf-py's own call
    assert np.array_equal(gguf_file.dequantize(vector, GGMLQuantizationType.F32), vector)


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 2**32 - 1)
    w.add_int32("t.i32", -(2**31))
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.25, -1.5])
    w.add_array("t.strs", ["<s>", "", "▁the", "<end_of_turn>", "ü" * 40])
    w.add_array("t.none", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 8)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((5,)).astype(np.float16))
    for qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1):
        rows = quantize(rng.standard_normal((4, 64)).astype(np.float32), qtype)
        w.add_tensor(qtype.name.lower(), rows, raw_shape=rows.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_matches_gguf_py_on_every_value_type_and_tensor_kind(written):
    _assert_same_as_gguf_py(written)
    f = GGUFFile(written)
    strs = f.metadata["t.strs"]
    assert (len(strs), strs[3], strs.raw(2), strs[-1], strs[1:3]) == (
        5,
        "<end_of_turn>",
        "▁the".encode(),
        "ü" * 40,
        ["", "▁the"],
    )
    q8 = next(t for t in f.tensors if t.name == "q8_0")
    assert (q8.dims, q8.data.shape, q8.data.flags.writeable) == ((64, 4), (4, 2 * 34), False)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2_gguf", "gemma3_gguf"])
def test_matches_gguf_py_on_the_packaged_models(fixture, request):
    _assert_same_as_gguf_py(request.getfixturevalue(fixture))


def test_broken_files_are_refused_with_what_is_wrong(written, tmp_path):
    data = written.read_bytes()
    cases = {
        b"": "it is empty",
        b"GGML" + data[4:]: "no GGUF magic",
        data[:4] + (1).to_bytes(4, "little") + data[8:]: "version 1 is not supported",
        data[:4] + (3).to_bytes(4, "big") + data[8:]: "a big-endian file",
        data[:200]: "truncated or corrupt",
        data[: len(data) - 10]: "truncated: tensor 'q4_1'",
    }
    for i, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"broken{i}.gguf"
        path.write_bytes(content)
        with pytest.raises(GGUFFormatError, match=message):
            GGUFFile(path)

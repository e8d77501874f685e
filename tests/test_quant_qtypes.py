"""The qtype registry: ranges, dtypes, the NF4 codebook and error messages."""

import pytest
import torch

from graphlora.errors import QuantizationError
from graphlora.quant import NF4_CODEBOOK, check_qtype_use, get_qtype, is_valid_for, qtype_names

# bitsandbytes functional.py get_4bit_type("nf4") / csrc nf4_data, copied from the QLoRA paper's
# appendix — literature constants, not values read from graphlora.
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_nf4_codebook_matches_bitsandbytes():
    assert list(NF4_CODEBOOK) == BNB_NF4
    assert torch.equal(get_qtype("nf4").codebook(), torch.tensor(BNB_NF4, dtype=torch.float32))


@pytest.mark.parametrize(
    "name,bits,qmin,qmax,code_dtype,packed",
    [
        ("int4", 4, -8, 7, torch.int8, True),
        ("uint4", 4, 0, 15, torch.uint8, True),
        ("int8", 8, -128, 127, torch.int8, False),
        ("uint8", 8, 0, 255, torch.uint8, False),
        ("int16", 16, -32768, 32767, torch.int16, False),
        ("uint16", 16, 0, 65535, torch.int32, False),
        ("nf4", 4, 0, 15, torch.uint8, True),
        ("fp8_e4m3", 8, -448, 448, torch.float8_e4m3fn, False),
    ],
)
def test_registry_entries(name, bits, qmin, qmax, code_dtype, packed):
    q = get_qtype(name)
    assert (q.bits, q.qmin, q.qmax, q.code_dtype, q.packed) == (bits, qmin, qmax, code_dtype, packed)
    assert q.storage_dtype == (torch.uint8 if packed else code_dtype)
    assert get_qtype(q) is q


def test_kinds():
    assert get_qtype("nf4").kind == "nf4"
    assert get_qtype("fp8_e4m3").kind == "float8"
    assert {get_qtype(n).kind for n in ("int4", "uint4", "int8", "uint8", "int16", "uint16")} == {"int"}


def test_unknown_qtype_lists_valid_names():
    with pytest.raises(QuantizationError) as err:
        get_qtype("int3")
    msg = str(err.value)
    assert "int3" in msg
    for name in qtype_names():
        assert name in msg


def test_weight_and_activation_validity():
    assert {n for n in qtype_names() if is_valid_for(n, "weight")} == {
        "int4", "uint4", "int8", "uint8", "nf4", "fp8_e4m3"}
    assert {n for n in qtype_names() if is_valid_for(n, "activation")} == {
        "uint8", "int8", "int16", "uint16"}
    with pytest.raises(QuantizationError, match="activation"):
        check_qtype_use("nf4", "activation")
    with pytest.raises(QuantizationError, match="weight"):
        check_qtype_use("int16", "weight")
    assert check_qtype_use("uint8", "activation").name == "uint8"


def test_codebook_only_for_nf4():
    with pytest.raises(QuantizationError):
        get_qtype("int4").codebook()

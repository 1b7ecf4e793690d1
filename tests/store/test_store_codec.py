"""Facts about the codec (header, checksum, int8) and the content-addressed keys."""

import pytest
import torch
from tests.helpers.kv import block

from store.codec import CorruptEntry, decode, encode
from store.keys import chunk_key, chunk_of, layer_key, manifest_key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    tensor = block(1, dtype=dtype)
    out = decode(encode(tensor))
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out.view(torch.uint8), tensor.view(torch.uint8))


def test_int64_manifest_round_trip_and_is_never_quantized():
    ids = torch.tensor([3, -1, 2**40], dtype=torch.int64)
    assert torch.equal(decode(encode(ids, quantize_floats=True)), ids)


@pytest.mark.parametrize("where", ["magic", "version", "shape", "length", "checksum", "payload first",
                                   "payload last"])
def test_a_flipped_byte_anywhere_is_detected(where):
    data = bytearray(encode(block(2)))
    ndim = 4
    offsets = {"magic": 0, "version": 4, "shape": 9, "length": 9 + 4 * ndim, "checksum": 9 + 4 * ndim + 8,
               "payload first": 9 + 4 * ndim + 12, "payload last": len(data) - 1}
    data[offsets[where]] ^= 0x10
    with pytest.raises(CorruptEntry):
        decode(bytes(data))


@pytest.mark.parametrize("keep", [0, 5, 20, -1])
def test_a_truncated_value_is_detected(keep):
    data = encode(block(3))
    with pytest.raises(CorruptEntry):
        decode(data[:keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_error_is_within_half_a_step_of_each_row(dtype):
    tensor = block(4, shape=(64, 2, 3, 16), dtype=dtype) * 5
    data = encode(tensor, quantize_floats=True)
    out = decode(data)
    assert out.dtype == dtype and out.shape == tensor.shape
    step = tensor.float().abs().amax(dim=-1, keepdim=True) / 127
    # half a step from rounding, plus the target dtype's own rounding of the dequantized value
    bound = step / 2 + tensor.float().abs() * (2**-8 if dtype == torch.bfloat16 else 1e-6)
    assert ((out.float() - tensor.float()).abs() <= bound + 1e-7).all()
    # one byte per element plus a float32 scale per row of 16
    assert len(data) <= tensor.numel() * (1 + 4 / 16) + 64


def test_encode_rejects_an_unsupported_dtype_by_name():
    with pytest.raises(ValueError, match="complex64"):
        encode(torch.zeros(2, dtype=torch.complex64))


def test_chunk_key_is_a_content_address():
    base = chunk_key("model-a", [1, 2], [5, 6, 7], torch.float32)
    assert base == chunk_key("model-a", (1, 2), (5, 6, 7), "float32")
    assert len(base) == 64 and int(base, 16) >= 0
    others = {
        chunk_key("model-b", [1, 2], [5, 6, 7], torch.float32),
        chunk_key("model-a", [1], [2, 5, 6, 7], torch.float32),  # same tokens, split differently
        chunk_key("model-a", [1, 2], [5, 6, 8], torch.float32),
        chunk_key("model-a", [1, 2], [5, 6, 7], torch.bfloat16),
    }
    assert base not in others and len(others) == 4


def test_entry_keys_belong_to_their_chunk():
    key = chunk_key("m", [], [1], torch.float32)
    assert chunk_of(layer_key(key, 3)) == key == chunk_of(manifest_key(key))
    assert layer_key(key, 3) != layer_key(key, 4) != manifest_key(key)


def test_empty_fingerprint_is_refused():
    with pytest.raises(ValueError, match="fingerprint"):
        chunk_key("", [], [1], torch.float32)

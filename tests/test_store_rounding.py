"""kernels/_common.rounded_to, the one conversion every kernel uses to store fp32 results as
bf16/fp16, against torch's own ``.to(dtype)``: the same bits for every finite and infinite value,
a NaN for every NaN. Runs compiled on a CUDA device when there is one, else interpreted."""
import pytest
import torch
import triton
import triton.language as tl

from fastcore5.kernels._common import rounded_to

pytestmark = pytest.mark.any_device

BLOCK = 1024


@triton.jit
def _store_rounded(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n
    values = tl.load(src_ptr + offsets, mask=in_range)
    tl.store(dst_ptr + offsets, rounded_to(values, dst_ptr.dtype.element_ty), mask=in_range)


def _rounded_by_kernel(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full(values.shape, 7.0, dtype=dtype, device=values.device)  # anything but the answer
    _store_rounded[(triton.cdiv(values.numel(), BLOCK),)](values, out, values.numel(), BLOCK=BLOCK)
    return out


def _fp32_from_bits(bits) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


# fp32 bit patterns where rounding to bf16 (8 significant bits) or fp16 (11, subnormals below
# 2**-14, largest finite 65504) is easy to get wrong.
_EDGE_BITS = [
    0x00000000, 0x80000000,              # +-0
    0x7F800000, 0xFF800000,              # +-inf
    0x7FC00000, 0xFFC00000,              # quiet NaNs
    0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF,  # NaNs whose payload sits only in the bits bf16 drops
    0x3F808000, 0x3F818000,              # 1 + 2**-8, 1 + 3 * 2**-8: bf16 ties, to even down / up
    0x3F808001, 0x3F807FFF,              # just above / below a bf16 tie
    0x3F801000, 0x3F803000,              # 1 + 2**-11, 1 + 3 * 2**-11: fp16 ties
    0x00008000, 0x00018000, 0x80018000,  # fp32 subnormals that are bf16 ties
    0x00000001, 0x007FFFFF,              # smallest and largest fp32 subnormal
    0x7F7FFFFF, 0xFF7FFFFF,              # largest fp32: rounds past the largest bf16 to inf
    0x7F7F7FFF, 0x7F7F8000,              # just below / at the bf16 overflow tie
    0x477FE000, 0x477FEFFF, 0x477FF000,  # 65504, just below the fp16 overflow tie, the tie
    0x33000000, 0x33400000, 0x33C00000,  # 2**-25 (fp16 tie to 0), 1.5 * 2**-25, 3 * 2**-25
    0x38800000, 0x387FE000,              # 2**-14 (smallest normal fp16), a fp16 subnormal tie
]


# The interpreter's fp16 cast is numpy's, which warns on the overflow to inf that is tested here.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounded_to_matches_torch_bit_for_bit(dtype, device):
    random_bits = torch.randint(-(2**31), 2**31, (3000,), dtype=torch.int64).to(torch.int32)
    values = torch.cat([_fp32_from_bits(_EDGE_BITS), random_bits.view(torch.float32),
                        torch.randn(2000) * 1e3, torch.randn(1000) * 1e-6]).to(device)
    expected = values.to(dtype)
    ours = _rounded_by_kernel(values, dtype)
    nan = torch.isnan(expected)
    assert nan.any() and torch.isinf(expected).any()  # the edge cases above reached both
    assert torch.equal(torch.isnan(ours), nan), values[torch.isnan(ours) != nan]
    mismatch = ours[~nan].view(torch.int16) != expected[~nan].view(torch.int16)
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} values rounded differently, e.g. fp32 {values[~nan][mismatch][:5].tolist()} "
        f"-> {ours[~nan][mismatch][:5].tolist()}, torch {expected[~nan][mismatch][:5].tolist()}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rounded_to_wider_or_equal_dtypes_is_the_plain_conversion(dtype, device):
    values = torch.cat([torch.randn(500), _fp32_from_bits([0x7F800000, 0xFF800000, 0x7FC00000])]).to(device)
    ours = _rounded_by_kernel(values, dtype)
    assert torch.equal(ours.isnan(), values.isnan())
    assert torch.equal(ours[~values.isnan()], values[~values.isnan()].to(dtype))

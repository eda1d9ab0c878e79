"""The launchers' host-side integer helpers: those Triton also has give what Triton's give (which cost ~1.5 us per
host call); the stride alignment that the kernels are promised divides every stride and is the largest such."""
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from rgt_fast.kernels._common import cdiv, next_power_of_2, next_power_of_2_at_least_16, row_alignment, stride_alignment


@settings(max_examples=300, derandomize=True)
@given(numerator=st.integers(0, 2**40), denominator=st.integers(1, 2**20))
def test_cdiv_is_tritons(numerator, denominator):
    assert cdiv(numerator, denominator) == triton.cdiv(numerator, denominator)


@settings(max_examples=300, derandomize=True)
@given(n=st.integers(1, 2**40))
def test_next_power_of_2_is_tritons(n):
    assert next_power_of_2(n) == triton.next_power_of_2(n)
    assert next_power_of_2_at_least_16(n) == max(16, triton.next_power_of_2(n))


def test_powers_of_two_and_their_neighbours():
    for exponent in range(0, 41):
        power = 2**exponent
        assert next_power_of_2(power) == power
        assert next_power_of_2(power + 1) == 2 * power
        assert next_power_of_2_at_least_16(power) == max(16, power)


@settings(max_examples=300, derandomize=True)
@given(strides=st.lists(st.integers(0, 2**40), min_size=1, max_size=6), max_exponent=st.integers(0, 4))
def test_stride_alignment_is_the_largest_power_of_two_dividing_every_stride(strides, max_exponent):
    alignment = stride_alignment(strides, 2**max_exponent)
    assert all(stride % alignment == 0 for stride in strides)
    assert alignment == 2**max_exponent or any(stride % (2 * alignment) for stride in strides)


def test_row_alignment_reads_batch_and_token_strides_up_to_16_bytes():
    rows_540 = torch.empty(2, 5, 540, dtype=torch.bfloat16, device="meta")
    assert row_alignment(rows_540) == 4  # 540 = 4 x 135
    assert row_alignment(torch.empty(2, 5, 512, dtype=torch.bfloat16, device="meta")) == 8  # 16 bytes
    assert row_alignment(torch.empty(2, 5, 512, dtype=torch.float32, device="meta")) == 4
    assert row_alignment(rows_540, torch.empty(2, 5, 541, dtype=torch.bfloat16, device="meta")) == 1
    assert row_alignment(rows_540, max_bytes=4) == 2  # L-SA's claim: pairs of 16-bit elements
    assert row_alignment(torch.empty(2, 5, 540, dtype=torch.float32, device="meta"), max_bytes=4) == 1
    channel_major = torch.empty(2, 180, 5, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    assert row_alignment(channel_major) == 1  # token stride 1: consecutive tokens' rows start one element apart

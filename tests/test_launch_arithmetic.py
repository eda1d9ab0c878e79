"""The launchers' host-side integer helpers give what Triton's own give (which cost ~1.5 us per host call)."""
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from rgt_fast.kernels._common import cdiv, next_power_of_2, next_power_of_2_at_least_16


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

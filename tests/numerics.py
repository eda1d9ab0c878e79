"""The error rules the kernel and model tests share."""
import torch


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_within_flash_attention_bound(actual: torch.Tensor, low_precision_reference: torch.Tensor,
                                        exact: torch.Tensor, slack: float, what: str) -> None:
    """FlashAttention's rule: the error of ``actual`` against the float64 ``exact`` is at most twice the error of
    the reference run in the same low precision, plus ``slack``."""
    error, reference_error = max_error(actual, exact), max_error(low_precision_reference, exact)
    bound = 2 * reference_error + slack
    assert error <= bound, f"{what}: error {error:.3e} > {bound:.3e} (2 x reference's {reference_error:.3e} + slack)"


def assert_fp32_close_to_exact(actual: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """An fp32 result against float64: 2e-6 of the largest exact value absolute, 2e-5 relative."""
    torch.testing.assert_close(actual.double(), exact, atol=2e-6 * exact.abs().max().item(), rtol=2e-5, msg=what)

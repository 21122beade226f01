"""The accuracy policy, shared by the test suite and ``flash-softmax verify`` (docs/semantics.md, 'Accuracy
policy').

A low-precision result is judged against how well the same computation can be done in that precision:
it passes when its max error against the truth is at most ``factor`` times the max error of the
reference computed in the input dtype, plus a small floor for values that happen to round exactly.
float32 results must be within ``1e-5`` relative of a float64 truth.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

#: Allowed multiple of the low-precision reference's own error.
OUTPUT_FACTOR = 2.0
GRADIENT_FACTOR = 3.0
#: Relative bound for float32 results against a float64 truth.
FLOAT32_RTOL = 1e-5


@dataclass
class Comparison:
    """The outcome of comparing one tensor with the truth."""

    name: str
    max_error: float
    mean_error: float
    reference_error: float  # the input-dtype reference's max error (NaN where not used)
    bound: float
    worst_index: tuple[int, ...]
    passed: bool

    @property
    def ratio(self) -> float:
        """max_error over the bound: <= 1 passes."""
        return self.max_error / self.bound if self.bound > 0 else float("inf") * (self.max_error > 0)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.name}: {verdict} max_err={self.max_error:.3e} mean_err={self.mean_error:.3e} "
            f"ref_err={self.reference_error:.3e} bound={self.bound:.3e} worst_index={self.worst_index}"
        )


def _rounding_floor(dtype: torch.dtype, magnitude: float) -> float:
    """Half an ulp of ``dtype`` at a quarter of ``magnitude``: a floor for results whose reference is exact."""
    return 0.25 * torch.finfo(dtype).eps * max(magnitude, 1.0)


def _nan_aware_error(actual: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|actual - truth| in float64, 0 where both are equal (including both inf or both NaN), inf elsewhere."""
    a, t = actual.double(), truth.double()
    same = (a == t) | (torch.isnan(a) & torch.isnan(t))
    err = (a - t).abs()
    err = torch.where(same, torch.zeros_like(err), err)
    return torch.nan_to_num(err, nan=float("inf"))


def compare(
    name: str,
    actual: torch.Tensor,
    truth: torch.Tensor,
    lowp_reference: torch.Tensor | None,
    *,
    factor: float = OUTPUT_FACTOR,
) -> Comparison:
    """Judge ``actual`` against ``truth`` by the accuracy policy.

    Args:
        name: what is compared, for the report.
        actual: the kernel's result, any dtype.
        truth: the reference computed in float32 or float64, same shape.
        lowp_reference: the reference computed in ``actual``'s dtype (``upcast=False``); unused for
            float32/float64 results, which are held to ``FLOAT32_RTOL`` relative instead.
        factor: ``OUTPUT_FACTOR`` for outputs and lse, ``GRADIENT_FACTOR`` for gradients.
    """
    if actual.shape != truth.shape:
        raise ValueError(f"{name}: shape {tuple(actual.shape)} differs from the truth's {tuple(truth.shape)}")
    if actual.numel() == 0:
        return Comparison(name, 0.0, 0.0, 0.0, 0.0, (), True)
    err = _nan_aware_error(actual, truth)
    finite_truth = truth.double()[torch.isfinite(truth)]
    magnitude = finite_truth.abs().max().item() if finite_truth.numel() else 0.0
    if actual.dtype in (torch.float32, torch.float64):
        reference_error = float("nan")
        # Relative to the values' scale, floored at 1 so exact zeros (e.g. dq with one key) keep a tolerance.
        bound = FLOAT32_RTOL * max(magnitude, 1.0)
    else:
        if lowp_reference is None:
            raise ValueError(f"{name}: a {actual.dtype} result needs the input-dtype reference to be judged")
        reference_error = _nan_aware_error(lowp_reference, truth).max().item()
        bound = factor * reference_error + _rounding_floor(actual.dtype, magnitude)
    max_error = err.max().item()
    flat = int(err.argmax().item())
    worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
    finite_err = err[torch.isfinite(err)]
    mean_error = finite_err.mean().item() if finite_err.numel() else float("inf")
    return Comparison(name, max_error, mean_error, reference_error, bound, worst, max_error <= bound)


# Only ``__wrapped__`` is taken from ``compare``: ``inspect.signature`` and help() show its arguments, which
# are passed through unchanged; the name and docstring stay this function's own.
@functools.wraps(compare, assigned=())
def assert_close(*args, **kwargs) -> Comparison:
    """``compare`` (same arguments) and raise ``AssertionError`` with the full report when the result fails."""
    result = compare(*args, **kwargs)
    if not result.passed:
        raise AssertionError(str(result))
    return result

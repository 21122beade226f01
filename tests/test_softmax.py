"""softmax / log_softmax kernels against torch in float64, judged by the accuracy policy (docs/semantics.md,
'Accuracy policy').

On a CPU these run the real Triton kernels in the interpreter; on a GPU, compiled. Row lengths are chosen
on both sides of the single-block limit (``configs.single_block_limit()``: 4096 in the interpreter, 16384
compiled), so both the one-tile and the tiled (online) regime run, forward and backward, on either machine.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import flash_softmax as fs
from flash_softmax import reference
from flash_softmax.softmax.backward import softmax_backward
from flash_softmax.softmax.configs import KernelConfig, choose_config, single_block_limit
from flash_softmax.softmax.forward import softmax_forward
from flash_softmax.softmax.layout import row_layout
from flash_softmax.testing import GRADIENT_FACTOR, OUTPUT_FACTOR, assert_close

from conftest import DEVICE

# Rows that are all -inf are NaN by definition (-inf - (-inf), log(0), 1/0), and padding lanes compute the
# same before they are masked out of the store; numpy, which runs the interpreter, warns about each. The
# results are checked below, so these warnings carry no information.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
OPS = ["softmax", "log_softmax"]
LIMIT = single_block_limit()
INF = float("inf")
NAN = float("nan")


def kernel_op(op):
    return {"softmax": fs.softmax, "log_softmax": fs.log_softmax}[op]


def reference_op(op):
    return {"softmax": reference.softmax, "log_softmax": reference.log_softmax}[op]


def make_input(shape, dtype, seed=0, scale=3.0):
    """A random tensor on DEVICE; the scale spreads values so that the softmax is not nearly uniform."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator)).to(device=DEVICE, dtype=dtype)


def run_reference(op, x, dim, dy, dtype):
    """Output and input gradient of torch's op, computed from a copy of x in ``dtype``."""
    leaf = x.detach().to(dtype).requires_grad_()
    y = reference_op(op)(leaf, dim, upcast=dtype != x.dtype)
    if dy is None:
        return y, None
    y.backward(dy.to(dtype))
    return y, leaf.grad


def check_op(op, x, dim, check_grad=True, dy=None):
    """Run the kernel on x (any layout), the float64 truth and the input-dtype reference; assert the
    accuracy policy for y and (with ``check_grad``) dx.

    ``dy`` defaults to a random gradient; it may be passed in any layout.
    """
    leaf = x.detach().requires_grad_(check_grad)
    y = kernel_op(op)(leaf, dim)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    if check_grad and dy is None:
        dy = make_input(x.shape, x.dtype, seed=1, scale=1.0)
    truth_y, truth_grad = run_reference(op, x, dim, dy if check_grad else None, torch.float64)
    lowp_y, lowp_grad = (None, None)
    if x.dtype != torch.float32:
        lowp_y, lowp_grad = run_reference(op, x, dim, dy if check_grad else None, x.dtype)
    assert_close(f"{op} y", y, truth_y, lowp_y, factor=OUTPUT_FACTOR)
    if check_grad:
        y.backward(dy)
        assert leaf.grad.shape == x.shape and leaf.grad.dtype == x.dtype
        assert_close(f"{op} dx", leaf.grad, truth_grad, lowp_grad, factor=GRADIENT_FACTOR)
    return y


# --------------------------------------------------------------------------------------------------------
# Shapes, dtypes and both regimes through the public functions


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "shape",
    [(1, 1), (7, 33), (1823, 781), (2, 70001), (3, LIMIT), (3, LIMIT + 1), (2, 2 * LIMIT + 77)],
    ids=str,
)
def test_rows(shape, op, dtype):
    expected_tiled = shape[-1] > LIMIT
    assert choose_config(shape[-1], shape[0], columns_contiguous=True).tiled == expected_tiled
    check_op(op, make_input(shape, dtype), -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "shape, dim",
    [
        ((50,), 0),
        ((50,), -1),
        ((37, 6), 0),
        ((5, 37, 6), 1),
        ((33, 4, 5), 0),
        ((2, 3, 17, 4), -2),
        ((2, 3, 17, 4), 1),
        ((2, 3, 17, 4), -4),
        ((3, 1, 9), 1),  # rows of length 1: softmax is 1, log_softmax 0
    ],
    ids=str,
)
def test_any_dim(shape, dim, op, dtype):
    check_op(op, make_input(shape, dtype), dim)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_along_a_middle_dim(op, dtype):
    """The tiled regime with rows strided in memory and several rows per program."""
    check_op(op, make_input((2, LIMIT + 300, 3), dtype), 1)


@pytest.mark.parametrize("op", OPS)
def test_zero_dim_tensor(op):
    for value in (3.0, -INF, NAN):
        x = torch.tensor(value, device=DEVICE)
        expected = getattr(torch, op)(x, 0)
        torch.testing.assert_close(kernel_op(op)(x, 0), expected, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(kernel_op(op)(x, -1), expected, equal_nan=True, rtol=0, atol=0)
    check_op(op, torch.tensor(0.5, device=DEVICE), 0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape, dim", [((0,), 0), ((0, 5), -1), ((5, 0), -1), ((5, 0), 0), ((3, 0, 4), 1)], ids=str)
def test_empty(shape, dim, op):
    x = torch.empty(shape, device=DEVICE).requires_grad_()
    y = kernel_op(op)(x, dim)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


# --------------------------------------------------------------------------------------------------------
# Layouts: strided inputs, strided gradients, and the claim that they are used without copies


def strided_cases(dtype):
    """(name, x, dim) for inputs that are not contiguous."""
    base = make_input((64, 150), dtype)
    four_d = make_input((3, 5, 7, 40), dtype)
    return [
        ("transposed, last dim", base.t(), -1),
        ("transposed, first dim", base.t(), 0),
        ("column slice", base[:, 3:140:2], -1),
        ("row and column slice", base[1::3, 5:-5], 1),
        ("permuted 4-d", four_d.permute(2, 0, 3, 1), 2),
        ("permuted 4-d, middle dim", four_d.permute(0, 3, 1, 2), 1),
        ("expanded", make_input((1, 90), dtype).expand(12, 90), -1),
        ("permuted and sliced", four_d.permute(3, 1, 0, 2)[::2, :, 1:, ::3], 1),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_strided_inputs(op, dtype):
    for name, x, dim in strided_cases(dtype):
        assert not x.is_contiguous(), name
        try:
            check_op(op, x, dim)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dim", [0, 1])
def test_strided_gradient(op, dim):
    x = make_input((40, 70), torch.float32)
    check_op(op, x, dim, dy=make_input((70, 40), torch.float32, seed=2).t())
    check_op(op, x, dim, dy=make_input((40, 140), torch.float32, seed=2)[:, ::2])
    # y.sum().backward() hands back an expanded gradient with stride 0.
    check_op(op, x, dim, dy=torch.ones((), device=DEVICE).expand(40, 70))


@pytest.mark.parametrize("op", OPS)
def test_gradient_laid_out_unlike_the_output(op):
    """y, dy and dx with no common row view: the backward computes on copies and keeps dx's layout."""
    x = make_input((4, 3, 5, 6), torch.float32)
    dy = make_input((3, 4, 5, 6), torch.float32, seed=1).transpose(0, 1)
    assert row_layout((x, dy, x), 3) is None
    check_op(op, x, 3, dy=dy)
    # A dense, permuted x gives a permuted y and dx; a contiguous dy then needs dx to be filled by a copy.
    x_permuted = make_input((3, 4, 5, 6), torch.float32).transpose(0, 1)
    check_op(op, x_permuted, 3, dy=make_input((4, 3, 5, 6), torch.float32, seed=1))


def test_layouts_are_used_without_copies():
    """Dense and sliced layouts get a row view; only a layout with three incompatible row groups does not."""
    base = torch.empty(64, 150)
    four_d = torch.empty(3, 5, 7, 40)
    views = [
        (base.t(), -1),
        (base.t(), 0),
        (base[1::3, 5:-5], 1),
        (four_d.permute(2, 0, 3, 1), 2),
        (four_d.permute(0, 3, 1, 2), 1),
        (four_d[:, :, ::2, :], 3),
        (torch.empty(1, 90).expand(12, 90), -1),
    ]
    for x, dim in views:
        dim = dim % x.dim()
        layout = row_layout((x, torch.empty_like(x)), dim)
        assert layout is not None, (x.shape, x.stride(), dim)
        assert layout.n_rows * layout.n_cols == x.numel()
        assert layout.strides[0][1] == x.stride(dim)
    weird = four_d.permute(3, 1, 0, 2)[::2, :, 1:, ::3]
    assert row_layout((weird, torch.empty_like(weird)), 1) is None


def test_dense_output_keeps_input_strides():
    x = make_input((3, 5, 7, 40), torch.float32).permute(2, 0, 3, 1)
    y = fs.softmax(x, dim=1)
    assert y.stride() == x.stride()


# --------------------------------------------------------------------------------------------------------
# Both regimes on short rows: launch the kernels with a forced configuration


FORCED_CONFIGS = [
    KernelConfig(tiled=False, block_size=128, rows_per_program=1, num_warps=4),
    KernelConfig(tiled=False, block_size=128, rows_per_program=8, num_warps=4),
    KernelConfig(tiled=True, block_size=16, rows_per_program=1, num_warps=4),
    KernelConfig(tiled=True, block_size=32, rows_per_program=4, num_warps=4),
    KernelConfig(tiled=True, block_size=128, rows_per_program=2, num_warps=4),
]


@pytest.mark.parametrize("config", FORCED_CONFIGS, ids=lambda c: f"tiled={c.tiled}-{c.block_size}x{c.rows_per_program}")
@pytest.mark.parametrize("op", OPS)
def test_forced_regimes(op, config):
    """Forward and backward launchers agree with torch in each regime, on lengths that are not tile multiples."""
    log = op == "log_softmax"
    for shape, dim in [((13, 100), 1), ((100, 13), 0), ((3, 97, 5), 1)]:
        x = make_input(shape, torch.float32)
        dy = make_input(shape, torch.float32, seed=1, scale=1.0)
        truth_y, truth_grad = run_reference(op, x, dim, dy, torch.float64)
        y = softmax_forward(x, dim, log=log, config=config)
        assert_close(f"{op} y {shape}", y, truth_y, None)
        dx = softmax_backward(y, dy, dim, log=log, config=config)
        assert_close(f"{op} dx {shape}", dx, truth_grad, None, factor=GRADIENT_FACTOR)


# --------------------------------------------------------------------------------------------------------
# Special values: exactly torch's NaN / inf pattern, in both regimes


def special_rows(length):
    """Rows that probe the special values; the -inf prefix spans several 16-column tiles."""
    finite = torch.linspace(-3, 4, length)
    column = torch.arange(length)
    rows = {
        "finite": finite,
        "all -inf": torch.full((length,), -INF),
        "some -inf": torch.where(column % 3 == 0, -INF, finite),
        "-inf prefix": torch.where(column < length - 5, -INF, finite),
        "-inf except first": torch.where(column > 0, -INF, finite),
        "one +inf": torch.where(column == length // 2, INF, finite),
        "+inf and -inf": torch.where(column == 1, INF, torch.where(column == 2, -INF, finite)),
        "one NaN": torch.where(column == length - 1, NAN, finite),
        "NaN among -inf": torch.where(column == 7, NAN, torch.full((length,), -INF)),
        "large": finite * 1e4,
    }
    return list(rows), torch.stack(list(rows.values()))


def assert_same_values(name, actual, expected):
    """Same NaN positions, same infinities, finite values within float32 rounding of a float64 truth."""
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{name}: NaN pattern differs"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{name}: inf pattern differs"
    assert_close(name, actual.float(), expected.to(torch.float64), None)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("regime", ["single block", "tiled"])
def test_special_values(op, regime):
    length = 100
    names, rows = special_rows(length)
    x = rows.to(DEVICE)
    log = op == "log_softmax"
    if regime == "single block":
        config = choose_config(length, 1, columns_contiguous=True)
    else:
        config = KernelConfig(tiled=True, block_size=16, rows_per_program=2, num_warps=4)
    assert config.tiled == (regime == "tiled")
    y = softmax_forward(x, 1, log=log, config=config)
    expected = getattr(torch, op)(x.double(), 1)
    for index, name in enumerate(names):
        assert_same_values(f"{op} {regime} '{name}'", y[index], expected[index])
    # The same rows along dim 0 (columns strided in memory).
    y_t = softmax_forward(x.t().contiguous(), 0, log=log, config=config)
    assert_same_values(f"{op} {regime} along dim 0", y_t.t(), expected)


@pytest.mark.parametrize("op", OPS)
def test_special_values_through_the_public_function_in_the_tiled_regime(op):
    """A row longer than the single-block limit whose first tiles are all -inf stays finite, as in torch."""
    x = torch.full((3, LIMIT + 50), -INF, device=DEVICE)
    x[0, -10:] = torch.linspace(-1, 1, 10)  # -inf prefix longer than any tile
    x[2, -1] = NAN  # rows 1 (all -inf) and 2 must be NaN
    y = kernel_op(op)(x, -1)
    expected = getattr(torch, op)(x.double(), -1)
    for row in range(3):
        assert_same_values(f"{op} row {row}", y[row], expected[row])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("length", [100, LIMIT + 50], ids=["single block", "tiled"])
def test_gradient_with_minus_inf_entries(op, length):
    """-inf inputs: softmax gives them zero gradient, log_softmax passes dy through; nothing is NaN."""
    x = make_input((4, length), torch.float32)
    x[:, ::5] = -INF
    dy = make_input((4, length), torch.float32, seed=1, scale=1.0)
    leaf = x.clone().requires_grad_()
    kernel_op(op)(leaf, -1).backward(dy)
    _, truth_grad = run_reference(op, x, -1, dy, torch.float64)
    assert not torch.isnan(leaf.grad).any()
    assert_close(f"{op} dx", leaf.grad, truth_grad, None, factor=GRADIENT_FACTOR)


# --------------------------------------------------------------------------------------------------------
# Autograd: only y is saved


@pytest.mark.parametrize("op", OPS)
def test_backward_saves_only_the_output(op):
    x = make_input((6, 50), torch.float32).requires_grad_()
    packed = []

    def pack(tensor):
        packed.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = kernel_op(op)(x, -1)
    assert len(packed) == 1
    assert packed[0].data_ptr() == y.data_ptr() and packed[0].shape == y.shape
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()


def test_double_backward_is_refused():
    x = make_input((4, 9), torch.float32).requires_grad_()
    (grad,) = torch.autograd.grad(fs.softmax(x, -1).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(op):
    """The custom ops trace without graph breaks; the compiled graph still runs the kernels."""
    function = kernel_op(op)

    def loss(x):
        return function(2.0 * x, 1).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = make_input((5, 37), torch.float32).requires_grad_()
    (compiled_grad,) = torch.autograd.grad(compiled(x), x)
    (eager_grad,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=0)
    x64 = x.detach().double().requires_grad_()
    getattr(torch, op)(2.0 * x64, 1).square().sum().backward()
    assert_close(f"{op} compiled dx", compiled_grad, x64.grad, None, factor=GRADIENT_FACTOR)


def test_modules():
    x = make_input((4, 6, 5), torch.float32)
    softmax, log_softmax = fs.Softmax(dim=1), fs.LogSoftmax(dim=1)
    assert "dim=1" in repr(softmax) and "dim=1" in repr(log_softmax)
    torch.testing.assert_close(softmax(x), fs.softmax(x, 1), rtol=0, atol=0)
    torch.testing.assert_close(log_softmax(x), fs.log_softmax(x, 1), rtol=0, atol=0)
    assert torch.equal(fs.Softmax()(x), fs.softmax(x))


def test_torch_backend_path(monkeypatch):
    """Where no Triton backend applies, the functions return torch's result, with the same checks."""
    # importlib, because the attribute flash_softmax.softmax is the function, not this package.
    function = importlib.import_module("flash_softmax.softmax.function")
    monkeypatch.setattr(function, "backend_for", lambda device: "torch")
    x = make_input((5, 8), torch.bfloat16)
    assert torch.equal(fs.softmax(x, 0), torch.softmax(x, 0))
    assert torch.equal(fs.log_softmax(x, -1), torch.log_softmax(x, -1))
    with pytest.raises(TypeError, match="float64"):
        fs.softmax(x.double())


# --------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("op", OPS)
def test_errors(op):
    function = kernel_op(op)
    x = make_input((3, 4), torch.float32)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        function([1.0, 2.0])
    with pytest.raises(TypeError, match=r"x must have dtype float16, bfloat16 or float32, got torch.float64"):
        function(x.double())
    with pytest.raises(TypeError, match=r"got torch.int64"):
        function(torch.ones(3, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\] .* got 2"):
        function(x, 2)
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\] .* got -3"):
        function(x, -3)
    with pytest.raises(ValueError, match=r"dim must be in \[-1, 0\] .* got 1"):
        function(torch.tensor(1.0, device=DEVICE), 1)
    with pytest.raises(TypeError, match=r"dim must be an int, got float"):
        function(x, 1.0)
    with pytest.raises(TypeError, match=r"dim must be an int, got bool"):
        function(x, True)
    with pytest.raises(TypeError, match=r"dim must be an int, got NoneType"):
        function(x, None)


# --------------------------------------------------------------------------------------------------------
# Large shapes, compiled only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "shape, dim",
    [((8, 262144), -1), ((4096, 4096), -1), ((262144, 4), 0), ((4, 100003, 3), 1), ((70000, 50), -1)],
    ids=str,
)
def test_large(shape, dim, op, dtype):
    check_op(op, make_input(shape, dtype), dim)


def test_configs_regime_boundary():
    for columns_contiguous in (True, False):
        assert not choose_config(LIMIT, 1, columns_contiguous).tiled
        assert choose_config(LIMIT + 1, 1, columns_contiguous).tiled

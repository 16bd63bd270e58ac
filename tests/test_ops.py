"""The fused operator against the unfused PyTorch expression relu(batch_norm(x) + residual)."""
import bisect
import os
import pathlib
import random
import re
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import resnet_deploy
from resnet_deploy import _library
from resnet_deploy.ops import batch_norm_add_relu

OPS = torch.ops.resnet_deploy
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"))
DEVICES = ["cpu", CUDA]
FORMATS = [torch.contiguous_format, torch.channels_last]

# Odd shapes on purpose: C not a multiple of 8, 1x1 planes, N = 1, non-square planes; C = 64 and 128 (the
# channels_last sums specialized for them) with a row count not a multiple of the four rows summed together;
# small NCHW planes walked as long rows (1,170 values, not a whole number of vectors) over three rows; and small
# float32 NCHW planes walked in vector lanes, 16 channels a block (C a multiple of 16, over enough samples, 16 of
# 2,304 values, to be split between threads) and 8 (C = 24, with AVX2 or AVX-512: 49-value planes over three
# samples, summed one at a time, and 9-value planes over 160 samples, split between threads and summed four at once);
# and more channels than the forward keeps on each thread's stack (512), over samples split between threads.
SHAPES = [(2, 3, 5, 7), (4, 13, 1, 1), (1, 13, 1, 1), (3, 17, 9, 11), (8, 64, 6, 6), (2, 5, 3, 1), (1, 9, 4, 4),
          (1, 64, 3, 5), (3, 128, 5, 3), (3, 130, 3, 3), (16, 256, 3, 3), (3, 24, 7, 7), (160, 24, 3, 3),
          (12, 528, 3, 3)]


def _tolerances(dtype):
    return {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 3e-2),
            torch.float16: (5e-3, 5e-3)}[dtype]


def sample_inputs(shape, device, dtype, memory_format, with_residual, requires_grad=True, seed=0):
    """Input, residual, running stats and affine parameters as BatchNorm2d would hold them."""
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def tensor(*size, dtype=dtype, scale=1.0, offset=0.0):
        return (torch.randn(*size, generator=generator, dtype=torch.float64) * scale + offset).to(device, dtype)

    x = tensor(*shape, scale=2.0, offset=0.5).contiguous(memory_format=memory_format).requires_grad_(requires_grad)
    residual = None
    if with_residual:
        residual = tensor(*shape).contiguous(memory_format=memory_format).requires_grad_(requires_grad)
    return {
        "input": x,
        "residual": residual,
        "running_mean": tensor(channels, dtype=param_dtype, scale=0.1),
        "running_var": tensor(channels, dtype=param_dtype).abs() + 0.5,
        "weight": tensor(channels, dtype=param_dtype, offset=1.0).requires_grad_(requires_grad),
        "bias": tensor(channels, dtype=param_dtype).requires_grad_(requires_grad),
    }


def reference(s, training, momentum=0.1, eps=1e-5, compute_dtype=None):
    """The unfused expression, optionally computed in a wider dtype (running statistics too, written back)."""
    def cast(t):
        return t if t is None or compute_dtype is None else t.to(compute_dtype)

    running_mean, running_var = cast(s["running_mean"]), cast(s["running_var"])
    y = F.batch_norm(cast(s["input"]), running_mean, running_var, cast(s["weight"]), cast(s["bias"]),
                     training, momentum, eps)
    with torch.no_grad():
        for name, computed in (("running_mean", running_mean), ("running_var", running_var)):
            if computed is not s[name]:
                s[name].copy_(computed)
    if s["residual"] is not None:
        y = y + cast(s["residual"])
    return F.relu(y)


def fused(s, training, momentum=0.1, eps=1e-5):
    return batch_norm_add_relu(s["input"], s["residual"], s["running_mean"], s["running_var"], s["weight"],
                               s["bias"], training, momentum, eps)


def differentiable(s):
    return [s[k] for k in ("input", "residual", "weight", "bias") if s[k] is not None]


def clone_sample(s):
    """Independent leaves with the same values, so reference and fused op get their own gradients."""
    return {k: None if v is None else v.detach().clone(memory_format=torch.preserve_format).requires_grad_(v.requires_grad)
            for k, v in s.items()}


CASES = [(shape, fmt, res, training) for shape in SHAPES for fmt in FORMATS for res in (True, False)
         for training in (True, False) if not (training and shape[0] * shape[2] * shape[3] == 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,memory_format,with_residual,training", CASES)
def test_matches_unfused_expression(device, dtype, shape, memory_format, with_residual, training):
    s_fused = sample_inputs(shape, device, dtype, memory_format, with_residual)
    s_ref = clone_sample(s_fused)
    # The expression is computed in float64 for float32 inputs (PyTorch's own float32 channels_last BatchNorm
    # backward on one thread is off by up to 0.6 at 2x16x50x50 in torch 2.14.1) and in float32 for the
    # low-precision dtypes, on the same values.
    compute = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}.get(dtype)

    out = fused(s_fused, training)
    expected = reference(s_ref, training, compute_dtype=compute)
    rtol, atol = _tolerances(dtype)
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol)

    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    got = torch.autograd.grad(out, differentiable(s_fused), grad.to(out.dtype))
    want = torch.autograd.grad(expected, differentiable(s_ref), grad.to(expected.dtype))
    grad_atol = atol * 10 if dtype in (torch.bfloat16, torch.float16) else atol
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=grad_atol * max(1.0, w.abs().max().item()))

    # Running statistics: updated in training (unbiased variance), untouched in eval.
    torch.testing.assert_close(s_fused["running_mean"], s_ref["running_mean"], rtol=rtol, atol=atol)
    torch.testing.assert_close(s_fused["running_var"], s_ref["running_var"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("wanted", [("input",), ("residual",), ("weight", "bias"), ("input", "weight"),
                                    ("residual", "bias")])
def test_gradients_only_for_tensors_that_require_them(wanted, training):
    # A frozen layer, a residual branch without gradient, an input that is data: only the wanted gradients.
    s_fused = sample_inputs((3, 6, 5, 4), "cpu", torch.float64, torch.contiguous_format, True)
    for name in ("input", "residual", "weight", "bias"):
        s_fused[name].requires_grad_(name in wanted)
    s_ref = clone_sample(s_fused)
    out = fused(s_fused, training)
    expected = reference(s_ref, training)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for name in ("input", "residual", "weight", "bias"):
        if name in wanted:
            torch.testing.assert_close(s_fused[name].grad, s_ref[name].grad, rtol=1e-10, atol=1e-10)
        else:
            assert s_fused[name].grad is None


def test_no_autograd_record_without_gradients():
    s = sample_inputs((2, 3, 4, 4), "cpu", torch.float32, torch.contiguous_format, True, requires_grad=False)
    assert fused(s, training=True).grad_fn is None
    s["weight"].requires_grad_(True)
    assert fused(s, training=True).grad_fn is not None
    with torch.no_grad():
        assert fused(s, training=False).grad_fn is None



# ---- the two ways batch_norm_add_relu reaches the operators ----

class _RecordingMode(torch.overrides.TorchFunctionMode):
    """Records every function called under it and runs it unchanged, as a user's override may."""

    def __init__(self):
        super().__init__()
        self.called = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.called.append(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture(params=["eager", "torch.ops"])
def call_path(request):
    """In eager mode batch_norm_add_relu calls resnet_deploy._C; under TorchScript, torch.compile or a
    __torch_function__ override it calls torch.ops.resnet_deploy.* (here: under a recording override)."""
    if request.param == "eager":
        yield None
    else:
        with _RecordingMode() as mode:
            yield mode


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("memory_format", FORMATS)
def test_both_call_paths_match_unfused_expression(call_path, memory_format, with_residual, training):
    s_fused = sample_inputs((4, 16, 3, 5), "cpu", torch.float64, memory_format, with_residual)
    s_ref = clone_sample(s_fused)
    out = fused(s_fused, training, momentum=0.3)
    expected = reference(s_ref, training, momentum=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, differentiable(s_fused), grad),
                         torch.autograd.grad(expected, differentiable(s_ref), grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(s_fused[name], s_ref[name], rtol=1e-10, atol=1e-10)
    if call_path is not None:  # the override saw the operators
        assert (OPS.bn_add_relu_train if training else OPS.bn_add_relu_eval) in call_path.called
        assert (OPS.bn_update_running_stats in call_path.called) == training


class _Tagged(torch.Tensor):
    """A tensor subclass with a __torch_function__ override that records what it sees."""
    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_overrides_see_the_operators():
    s = sample_inputs((2, 4, 3, 3), "cpu", torch.float32, torch.contiguous_format, False, requires_grad=False)
    ref = clone_sample(s)
    s["input"] = s["input"].as_subclass(_Tagged)
    _Tagged.seen.clear()
    out = fused(s, training=False)
    assert OPS.bn_add_relu_eval in _Tagged.seen
    torch.testing.assert_close(out.as_subclass(torch.Tensor), reference(ref, training=False))


class _RefuseTorchOps:
    def __getattr__(self, name):
        raise AssertionError(f"torch.ops.resnet_deploy.{name} called in eager mode")


@pytest.mark.parametrize("training", [True, False])
def test_eager_calls_do_not_go_through_torch_ops(monkeypatch, training):
    monkeypatch.setattr(resnet_deploy.ops, "_ops", _RefuseTorchOps())
    s = sample_inputs((3, 8, 4, 4), "cpu", torch.float64, torch.contiguous_format, True)
    ref = clone_sample(s)
    torch.testing.assert_close(fused(s, training), reference(ref, training))
    torch.testing.assert_close(s["running_var"], ref["running_var"])


def test_eager_calls_release_the_gil():
    # Another Python thread runs while a call is inside the kernels. Holding the GIL, the call would let it run
    # only at its edges, for a switch interval (0.1 ms here) at most, not across most of the call.
    x = torch.randn(32, 64, 96, 96)
    stats = torch.zeros(64), torch.ones(64)
    windows, stamps = [], []
    calls_done = threading.Event()

    def call_repeatedly():
        try:
            for _ in range(10):
                start = time.perf_counter()
                batch_norm_add_relu(x, x, *stats, None, None, training=True)
                windows.append((start, time.perf_counter()))
        finally:
            calls_done.set()

    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)  # leaves a core to this thread
    sys.setswitchinterval(1e-4)
    try:
        caller = threading.Thread(target=call_repeatedly)
        caller.start()
        while not calls_done.is_set():
            stamps.append(time.perf_counter())
            time.sleep(5e-5)  # a stamp about every 0.1 ms; a thread needs the GIL to wake from the sleep
        caller.join()
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(interval)
    assert len(windows) == 10
    covered = []
    for start, end in windows:
        inside = stamps[bisect.bisect_right(stamps, start):bisect.bisect_left(stamps, end)]
        covered.append((inside[-1] - inside[0]) / (end - start) if len(inside) > 1 else 0.0)
    assert sorted(covered)[len(covered) // 2] > 0.5, covered


class _BlockGradient(torch.autograd.Function):
    """Identity forward; sends no gradient back (None), as a user's custom function may."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("training", [True, False])
def test_backward_reached_with_no_gradient_for_the_output(training):
    # The fused node still runs (x's gradient also flows around it), with nothing for its output: x gets only
    # the gradient of the path around it, as with the unfused expression.
    grads = []
    for op in (fused, reference):
        s = sample_inputs((3, 6, 5, 4), "cpu", torch.float64, torch.contiguous_format, True)
        loss = _BlockGradient.apply(op(s, training)).sum() + (s["input"] * 3).sum()
        loss.backward()
        assert s["residual"].grad is None and s["weight"].grad is None
        grads.append(s["input"].grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], torch.full_like(grads[0], 3.0))

@pytest.fixture
def streaming_stores():
    """Every float32 CPU output written with streaming stores, as large activations are."""
    previous = _library.load().set_streaming_min_bytes(0)
    yield
    _library.load().set_streaming_min_bytes(previous)


# Streamed outputs: NCHW planes with unaligned heads and tails (odd sizes) and planes over one 2048-value tile;
# channels_last rows of whole cache lines (C a multiple of 16; 64 and 128 are compiled as constants, their tiles of
# rows ending in a partial one here) and of partial ones (stored normally).
STREAMING_SHAPES = [(2, 3, 5, 7), (3, 17, 9, 11), (2, 16, 50, 50), (3, 32, 7, 5), (2, 48, 9, 9), (2, 64, 9, 9),
                    (2, 128, 5, 5), (1, 4096, 1, 2)]


@pytest.mark.parametrize("shape,memory_format,with_residual,training", [
    (shape, fmt, res, training) for shape in STREAMING_SHAPES for fmt in FORMATS for res in (True, False)
    for training in (True, False)])
def test_streamed_outputs_match_unfused_expression(streaming_stores, shape, memory_format, with_residual, training):
    test_matches_unfused_expression("cpu", torch.float32, shape, memory_format, with_residual, training)


def test_streaming_threshold_is_settable():
    library = _library.load()
    previous = library.set_streaming_min_bytes(123)
    try:
        assert library.streaming_min_bytes() == 123
    finally:
        library.set_streaming_min_bytes(previous)
    assert library.streaming_min_bytes() == previous


def _threshold_in_fresh_process(environment_value=None):
    env = {k: v for k, v in os.environ.items() if k != "RESNET_DEPLOY_STREAMING_MIN_BYTES"}
    if environment_value is not None:
        env["RESNET_DEPLOY_STREAMING_MIN_BYTES"] = environment_value
    code = "from resnet_deploy import _library; print(_library.load().streaming_min_bytes())"
    return int(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                              text=True).stdout.split()[-1])


def test_streaming_threshold_defaults_to_the_last_level_cache_at_most_32_mb():
    l3 = pathlib.Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    text = l3.read_text().strip() if l3.exists() else ""
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    cap = 32 * 1024 ** 2
    expected = min(int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text), cap) if text else cap
    assert _threshold_in_fresh_process() == expected
    assert _threshold_in_fresh_process("12345") == 12345
    assert _threshold_in_fresh_process("-1") == -1


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("memory_format", FORMATS)
def test_gradcheck(training, with_residual, memory_format):
    s = sample_inputs((3, 4, 3, 5), "cpu", torch.float64, memory_format, with_residual)

    def fn(x, *rest):
        residual = rest[0] if with_residual else None
        weight, bias = rest[-2:]
        # Fresh running stats each call: gradcheck calls fn many times.
        return batch_norm_add_relu(x, residual, s["running_mean"].clone(), s["running_var"].clone(), weight, bias,
                                   training)

    assert torch.autograd.gradcheck(fn, differentiable(s), eps=1e-6, atol=1e-5)


def test_momentum_and_missing_running_stats_in_training(call_path):
    s = sample_inputs((4, 6, 3, 3), "cpu", torch.float64, torch.contiguous_format, True)
    ref = clone_sample(s)
    fused_out = batch_norm_add_relu(s["input"], s["residual"], None, None, s["weight"], s["bias"], True)
    expected = F.relu(F.batch_norm(ref["input"], None, None, ref["weight"], ref["bias"], True) + ref["residual"])
    torch.testing.assert_close(fused_out, expected)
    # Without affine parameters, as BatchNorm2d(affine=False).
    out = batch_norm_add_relu(s["input"], None, s["running_mean"], s["running_var"], None, None, True, 0.3)
    expected = F.relu(F.batch_norm(ref["input"], ref["running_mean"], ref["running_var"], None, None, True, 0.3))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(s["running_var"], ref["running_var"])


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (2, 16, 2, 2)])  # small planes as rows, and in vector lanes
def test_nan_propagates_like_relu(shape):
    s = sample_inputs(shape, "cpu", torch.float32, torch.contiguous_format, True, requires_grad=False)
    s["residual"][0, 1, 0, 0] = float("nan")
    out = fused(s, training=False)
    assert torch.isnan(out[0, 1, 0, 0]) and torch.isfinite(out).sum() == out.numel() - 1


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (4, 16, 3, 3)])  # NCHW small planes as rows, and in vector lanes
def test_nan_and_inf_inputs_poison_their_channel_like_batchnorm(training, memory_format, shape):
    # One NaN or infinite value makes its channel's batch statistics NaN, and so its outputs and running statistics.
    s = sample_inputs(shape, "cpu", torch.float32, memory_format, False, requires_grad=False)
    s["input"][1, 1, 2, 2] = float("nan")
    s["input"][2, 2, 0, 0] = float("inf")
    s["running_var"][0] = float("nan")  # read in eval only
    ref = clone_sample(s)
    torch.testing.assert_close(fused(s, training), reference(ref, training), equal_nan=True)
    torch.testing.assert_close(s["running_mean"], ref["running_mean"], equal_nan=True)
    torch.testing.assert_close(s["running_var"], ref["running_var"], equal_nan=True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 0, 3), (2, 4, 3, 0), (0, 4, 3, 3)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_empty_input_gives_empty_output_like_batchnorm(call_path, training, shape, with_residual):
    s = sample_inputs(shape, "cpu", torch.float32, torch.contiguous_format, with_residual)
    ref = clone_sample(s)
    out, expected = fused(s, training), reference(ref, training)
    assert out.shape == expected.shape == shape
    got = torch.autograd.grad(out.sum(), differentiable(s))
    want = torch.autograd.grad(expected.sum(), differentiable(ref))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)  # zero weight and bias gradients: sums over no values
    torch.testing.assert_close(s["running_mean"], ref["running_mean"])  # untouched
    torch.testing.assert_close(s["running_var"], ref["running_var"])


@pytest.mark.parametrize("training", [True, False])
def test_no_channels_is_refused(call_path, training):
    s = sample_inputs((2, 0, 3, 3), "cpu", torch.float32, torch.contiguous_format, True, requires_grad=False)
    with pytest.raises(ValueError, match=r"expected at least one channel, got input of shape \[2, 0, 3, 3\]"):
        fused(s, training)


@pytest.mark.parametrize("with_residual", [True, False])
def test_double_backward_raises_instead_of_missing_gradients(with_residual):
    s = sample_inputs((2, 4, 3, 3), "cpu", torch.float64, torch.contiguous_format, with_residual)
    out = fused(s, training=True)
    (grad_input,) = torch.autograd.grad(out.pow(2).sum(), s["input"], create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for resnet_deploy::bn_add_relu_backward is not implemented"):
        torch.autograd.grad(grad_input.sum(), s["weight"])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("memory_format", FORMATS)
def test_opcheck(training, memory_format):
    s = sample_inputs((3, 5, 4, 3), "cpu", torch.float32, memory_format, True)
    if training:
        args = (s["input"], s["residual"], s["weight"], s["bias"], 1e-5)
        torch.library.opcheck(OPS.bn_add_relu_train, args)
        args_no_res = (s["input"], None, s["weight"], None, 1e-5)
        torch.library.opcheck(OPS.bn_add_relu_train, args_no_res)
    else:
        args = (s["input"], s["residual"], s["running_mean"], s["running_var"], s["weight"], s["bias"], 1e-5)
        torch.library.opcheck(OPS.bn_add_relu_eval, args)
    detached = {k: None if v is None else v.detach() for k, v in s.items()}
    out, mean, invstd = OPS.bn_add_relu_train(detached["input"], detached["residual"], detached["weight"],
                                              detached["bias"], 1e-5)
    grad = torch.randn_like(out)
    for residual_grad in (True, False):
        torch.library.opcheck(OPS.bn_add_relu_backward, (grad, out, detached["input"], mean, invstd,
                                                         detached["weight"], None, training, residual_grad))
    # Without a residual, the ReLU mask may come from the input instead of out.
    out, mean, invstd = OPS.bn_add_relu_train(detached["input"], None, detached["weight"], detached["bias"], 1e-5)
    torch.library.opcheck(OPS.bn_add_relu_backward, (grad, None, detached["input"], mean, invstd, detached["weight"],
                                                     detached["bias"], training, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 64, 24, 24), (8, 64, 6, 6), (8, 512, 3, 3), (6, 24, 3, 3), (3, 17, 1, 1),
                                   (5, 13, 3, 3)])
@pytest.mark.parametrize("memory_format", FORMATS)
def test_backward_with_mask_from_input_matches_mask_from_output(dtype, shape, memory_format):
    # After a forward without residual the backward may take the ReLU mask from the input (out=None): every walk
    # (NCHW planes; small planes in 16 or 8 vector lanes, float32, or as rows with repeated values; channels_last
    # rows) must give what reading out gives. (Streamed outputs go through it in
    # test_streamed_outputs_match_unfused_expression.)
    # Half the outputs are zero, so a mask off by one channel's scale or shift would show.
    s = sample_inputs(shape, "cpu", dtype, memory_format, False, requires_grad=False)
    out, mean, invstd = OPS.bn_add_relu_train(s["input"], None, s["weight"], s["bias"], 1e-5)
    assert 0.3 < (out == 0).float().mean().item() < 0.7
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grad = grad.contiguous(memory_format=memory_format)
    from_out = OPS.bn_add_relu_backward(grad, out, s["input"], mean, invstd, s["weight"], None, True, False)
    from_input = OPS.bn_add_relu_backward(grad, None, s["input"], mean, invstd, s["weight"], s["bias"], True, False)
    for got, want in zip(from_input, from_out):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_backward_without_out_refuses_a_residual_gradient():
    s = _good()
    out, mean, invstd = OPS.bn_add_relu_train(s["input"], None, s["weight"], s["bias"], 1e-5)
    with pytest.raises(ValueError, match=r"residual_grad needs out, the output of a forward with a residual"):
        OPS.bn_add_relu_backward(torch.ones_like(out), None, s["input"], mean, invstd, s["weight"], s["bias"], True,
                                 True)


@pytest.mark.parametrize("with_residual", [True, False])
def test_torch_compile_fullgraph(with_residual):
    # Without a residual the compiled backward takes the ReLU mask from the input (no saved output).
    s = sample_inputs((4, 6, 5, 5), "cpu", torch.float32, torch.channels_last, with_residual)
    ref = clone_sample(s)

    def block(x, residual, running_mean, running_var, weight, bias):
        return batch_norm_add_relu(x * 2, residual, running_mean, running_var, weight, bias, True)

    compiled = torch.compile(block, fullgraph=True)
    out = compiled(s["input"], s["residual"], s["running_mean"], s["running_var"], s["weight"], s["bias"])
    expected = F.batch_norm(ref["input"] * 2, ref["running_mean"], ref["running_var"], ref["weight"], ref["bias"], True)
    expected = F.relu(expected + ref["residual"] if with_residual else expected)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for name in ("input", "residual", "weight", "bias"):
        if ref[name] is not None:
            torch.testing.assert_close(s[name].grad, ref[name].grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s["running_var"], ref["running_var"])


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_running_stats_update_matches_batchnorm(stats_dtype):
    x = torch.randn(6, 5, 3, 4, dtype=torch.float64) * 3 + 1
    reference = torch.nn.BatchNorm2d(5, momentum=0.3).to(torch.float64)
    reference.running_mean.normal_()
    reference.running_var.uniform_(0.5, 2.0)
    running_mean = reference.running_mean.clone().to(stats_dtype)
    running_var = reference.running_var.clone().to(stats_dtype)
    reference.train()(x)
    _, mean, invstd = OPS.bn_add_relu_train(x, None, None, None, 1e-5)
    OPS.bn_update_running_stats(running_mean, running_var, mean, invstd, 0.3, 1e-5, 6 * 3 * 4)
    rtol, atol = _tolerances(stats_dtype)
    torch.testing.assert_close(running_mean, reference.running_mean.to(stats_dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(running_var, reference.running_var.to(stats_dtype), rtol=rtol, atol=atol)


def test_running_stats_update_writes_through_strided_buffers():
    stats = torch.zeros(2, 4)  # running mean in column 0, running var in column 1
    stats[:, 1] = 1.0
    mean, invstd = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25])
    OPS.bn_update_running_stats(stats[:, 0], stats[:, 1], mean, invstd, 0.5, 0.0, 5)
    expected_var = 0.5 * 1.0 + 0.5 * (1 / invstd**2) * 5 / 4
    torch.testing.assert_close(stats[:, 0], 0.5 * mean)
    torch.testing.assert_close(stats[:, 1], expected_var)


@pytest.mark.parametrize("mean_dtype,invstd_dtype,strided", [
    (torch.float32, torch.float32, False), (torch.float64, torch.float64, False),
    (torch.bfloat16, torch.bfloat16, False), (torch.float32, torch.float64, False), (torch.float32, torch.float32, True)])
def test_running_stats_update_reads_statistics_of_any_dtype_and_stride(mean_dtype, invstd_dtype, strided):
    mean = torch.tensor([[1.0, 9.0], [2.0, 9.0]], dtype=mean_dtype)[:, 0]
    invstd = torch.tensor([0.5, 0.25], dtype=invstd_dtype)
    if not strided:
        mean = mean.contiguous()
    running_mean, running_var = torch.zeros(2), torch.ones(2)
    OPS.bn_update_running_stats(running_mean, running_var, mean, invstd, 0.5, 0.0, 5)
    torch.testing.assert_close(running_mean, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(running_var, 0.5 + 0.5 * (1 / torch.tensor([0.5, 0.25]) ** 2) * 5 / 4)


def test_running_stats_update_opcheck():
    args = (torch.zeros(4), torch.ones(4), torch.randn(4), torch.rand(4) + 0.5, 0.1, 1e-5, 10)
    torch.library.opcheck(OPS.bn_update_running_stats, args)


@pytest.mark.parametrize("change,error,message", [
    ({"running_var": torch.ones(3)}, ValueError, "running_var must have shape [4], got [3]"),
    ({"mean": torch.zeros(2, 2)}, ValueError, "mean must have shape [4]"),
    ({"running_var": torch.ones(4, dtype=torch.float64)}, TypeError, "running_var must have running_mean's dtype"),
    ({"invstd": torch.ones(4, dtype=torch.int64)}, TypeError, "invstd must be floating-point"),
    ({"count": 1}, ValueError, "expected more than 1 value per channel, got 1"),
])
def test_running_stats_update_refuses_bad_input(change, error, message):
    args = {"running_mean": torch.zeros(4), "running_var": torch.ones(4), "mean": torch.zeros(4),
            "invstd": torch.ones(4), "momentum": 0.1, "eps": 1e-5, "count": 8, **change}
    with pytest.raises(error, match=re.escape(message)):
        OPS.bn_update_running_stats(*args.values())


def test_large_offset_statistics_are_stable():
    """A channel far from zero (mean 1000, std 0.01) must not lose its variance to cancellation."""
    x = (torch.randn(16, 3, 8, 8, dtype=torch.float64) * 0.01 + 1000).float()
    _, mean, invstd = OPS.bn_add_relu_train(x, None, None, None, 1e-5)
    exact = x.double()
    torch.testing.assert_close(mean.double(), exact.mean(dim=(0, 2, 3)), rtol=1e-7, atol=0)
    exact_invstd = torch.rsqrt(exact.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    torch.testing.assert_close(invstd.double(), exact_invstd, rtol=1e-5, atol=0)


# ---- errors a caller can make: one sentence that says what was wrong and what was expected ----

def _good():
    return sample_inputs((2, 4, 3, 3), "cpu", torch.float32, torch.contiguous_format, True, requires_grad=False)


@pytest.mark.parametrize("change,error,message", [
    (lambda s: s.update(input=s["input"][0]), ValueError, r"expected a 4-D input \(N, C, H, W\), got a 3-D tensor"),
    (lambda s: s.update(residual=s["residual"][:, :, :2]), ValueError, r"residual must have the input's shape"),
    (lambda s: s.update(weight=torch.ones(3)), ValueError, r"weight must have one value per channel \(shape \[4\]\)"),
    (lambda s: s.update(running_var=torch.ones(5)), ValueError, r"running_var must have one value per channel"),
    (lambda s: s.update(input=s["input"].to(torch.int32), residual=None), TypeError,
     r"expected a floating-point input .* got Int"),
    (lambda s: s.update(residual=s["residual"].double()), TypeError, r"residual must have the input's dtype Float"),
    (lambda s: s.update(residual=s["residual"].to("meta")), ValueError,
     r"all tensors must be on the input's device cpu, got one on meta"),
    (lambda s: s.update(running_mean=s["running_mean"].to("meta")), ValueError,
     r"all tensors must be on the input's device cpu, got one on meta"),
    (lambda s: s.update(bias=s["bias"].to("meta")), ValueError,
     r"all tensors must be on the input's device cpu, got one on meta"),
    (lambda s: s.update(running_var=None), ValueError,
     r"eval mode \(training=False\) needs running_mean and running_var"),
])
def test_bad_input_is_refused_clearly(call_path, change, error, message):
    s = _good()
    change(s)
    with pytest.raises(error, match=message):
        fused(s, training=False)


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_stats_of_another_channel_count_are_refused_before_the_forward(call_path, name):
    s = _good()
    s[name] = torch.zeros(3)
    with pytest.raises(ValueError, match=name + r" must have one value per channel \(shape \[4\]\), got shape \[3\]"):
        fused(s, training=True)


def test_training_needs_more_than_one_value_per_channel(call_path):
    s = sample_inputs((1, 4, 1, 1), "cpu", torch.float32, torch.contiguous_format, True, requires_grad=False)
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel when training, got input of shape "
                                         r"\[1, 4, 1, 1\]"):
        fused(s, training=True)
    fused(s, training=False)  # eval with one value per channel is fine


def test_eval_needs_running_stats(call_path):
    s = _good()
    with pytest.raises(ValueError, match="eval mode .* needs running_mean and running_var"):
        batch_norm_add_relu(s["input"], None, None, None, s["weight"], s["bias"], False)


# ---- build and registration ----

def test_operators_registered_for_cpu_and_autograd():
    for name in ("bn_add_relu_train", "bn_add_relu_eval", "bn_add_relu_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_deploy::{name}", "CPU")
    for name in ("bn_add_relu_train", "bn_add_relu_eval", "bn_add_relu_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_deploy::{name}", "Autograd")


@pytest.mark.skipif(not _library.build_info()["cuda"], reason="the library was built without CUDA")
def test_operators_registered_for_cuda():
    for name in ("bn_add_relu_train", "bn_add_relu_eval", "bn_add_relu_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_deploy::{name}", "CUDA")


def test_build_info_names_this_torch_and_openmp():
    info = _library.build_info()
    assert info["torch"] == torch.__version__
    assert info["openmp"], "without OpenMP at::parallel_for runs the kernels on one thread"
    assert resnet_deploy._C.__file__ == info["path"]


def test_cpu_kernels_match_torchs_own_cpu_capability():
    # PyTorch detects the CPU on its own: its AVX512 kernels need what the x86-64-v4 level names, its AVX2 ones v3.
    kernels = _library.cpu_kernels()
    expected = {"AVX512": ("x86-64-v4 (AVX-512)", 16), "AVX2": ("x86-64-v3 (AVX2)", 8)}
    level, lanes = expected.get(torch.backends.cpu.get_cpu_capability(), (kernels["level"], 0))
    assert kernels["level"] == level and kernels["small_plane_lanes"] == lanes
    assert kernels["streaming_min_bytes"] == _library.load().streaming_min_bytes()


def test_random_shapes_sweep():
    """A seeded sweep over shapes the fixed list does not name, float32, both layouts, training."""
    rng = random.Random(7)
    for _ in range(6):
        shape = (rng.randint(2, 9), rng.randint(1, 40), rng.randint(1, 13), rng.randint(1, 13))
        fmt = rng.choice(FORMATS)
        s = sample_inputs(shape, "cpu", torch.float32, fmt, rng.random() < 0.5, seed=rng.randint(0, 999))
        ref = clone_sample(s)
        torch.testing.assert_close(fused(s, True), reference(ref, True), rtol=1e-4, atol=1e-5)

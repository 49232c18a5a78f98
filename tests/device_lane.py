"""The device lane of the test suite: which device the model-running tests use, and tolerances that fit it.

``LRP_TEST_DEVICE`` names the device (default ``cpu``); tests take it from the ``device`` fixture (tests/conftest.py),
which marks them ``device``: ``make test-gpu`` runs exactly those with ``LRP_TEST_DEVICE=cuda``. On a machine
without that device every one of them skips with the reason, rather than pass having run nothing.

Tolerances. Tests that check an exact identity (conservation, LRP-0 = gradient x input, a closed form) run in
float64 on every device: CUDA float64 differs from the CPU only by the order of its sums, far below their
tolerances. Float32 on CUDA differs from the CPU by more: PyTorch runs float32 convolutions on cuDNN in **TF32**
by default (``torch.backends.cudnn.conv.fp32_precision == "tf32"``, formerly ``torch.backends.cudnn.allow_tf32``;
Ampere GPUs and later, the H100/H200 included): the inputs of each product are rounded to a 10-bit mantissa
(relative error up to ``2**-11``, about 5e-4), so a float32 heatmap from a CNN on the GPU agrees with the CPU's to
a few parts in a thousand, not to float32's 1e-7. Float32 matrix products stay IEEE unless
``torch.set_float32_matmul_precision("high")`` is set. :func:`assert_matches_cpu` compares a float32 result from
the device with the CPU's within :data:`TF32_REL` of its norm where TF32 may be on; on the CPU it applies the
test's own tolerances unchanged: the lane never loosens the CPU's.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import torch

DEVICE_ENV = "LRP_TEST_DEVICE"
TF32_REL = 1e-2  # ||device - cpu|| / ||cpu|| for float32 results where TF32 may round the products (see above)
FLOAT32_REL = 1e-4  # the same where the device computes float32 in IEEE (only the order of the sums differs)


def lane_spec() -> str:
    """The device ``LRP_TEST_DEVICE`` names, ``cpu`` when it is unset or empty."""
    return os.environ.get(DEVICE_ENV, "").strip() or "cpu"


def skip_reason(spec: str) -> Optional[str]:
    """Why the tests of the lane cannot run on ``spec`` on this machine, or None when they can."""
    device = torch.device(spec)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{DEVICE_ENV}={spec} but torch.cuda.is_available() is False on this machine"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"{DEVICE_ENV}={spec} but this machine has {count} CUDA device(s)"
        return None
    if device.type == "meta":
        return f"{DEVICE_ENV}={spec}: tensors on the meta device hold no values to check"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{DEVICE_ENV}={spec} but torch.backends.mps.is_available() is False on this machine"
    try:
        torch.zeros(1, device=device)
    except Exception as exc:  # another backend (xpu, ...) that this torch or machine does not have
        return f"{DEVICE_ENV}={spec} but torch cannot use it here: {exc}"
    return None


def lane_summary() -> str:
    """One line for pytest's header: the lane's device and whether its tests will run."""
    spec = lane_spec()
    try:
        reason = skip_reason(spec)
    except RuntimeError:
        return f"device lane: {DEVICE_ENV}={spec!r} is not a device torch knows"
    state = f"the device tests skip: {reason}" if reason else "the device tests run there"
    tf32 = f"; float32 convolutions in TF32: {tf32_convolutions()}" if spec.startswith("cuda") and not reason else ""
    return f"device lane: {DEVICE_ENV}={spec} ({state}{tf32})"


def tf32_convolutions() -> bool:
    """Whether cuDNN may run float32 convolutions in TF32 (PyTorch's default)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision is not None and precision != "none":
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def tf32_matmul() -> bool:
    """Whether float32 matrix products on CUDA may run in TF32 (not PyTorch's default)."""
    return torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cuda.matmul.allow_tf32)


def tf32_possible(device: Union[str, torch.device]) -> bool:
    return torch.device(device).type == "cuda" and (tf32_convolutions() or tf32_matmul())


def float32_rel(device: Union[str, torch.device]) -> float:
    """The relative (norm) tolerance of a float32 result from ``device`` against the CPU's."""
    return TF32_REL if tf32_possible(device) else FLOAT32_REL


def _numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def assert_matches_cpu(actual, expected, device: Union[str, torch.device], *, rtol: float, atol: float,
                       what: str = "") -> None:
    """``actual`` (computed on ``device``) equals ``expected`` (computed on the CPU).

    On the CPU, and for float64 results on any device: elementwise within ``rtol``/``atol``, the test's own
    tolerances. For lower-precision results from another device: ``||actual - expected|| <= rel * ||expected||``
    with ``rel`` from :func:`float32_rel` (TF32, see the module docstring); an elementwise bound would fail on
    elements near zero that TF32 rounds, without telling anything about the explanation."""
    a, e = _numpy(actual), _numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    low_precision = (actual.dtype != torch.float64) if isinstance(actual, torch.Tensor) else \
        (np.asarray(actual).dtype != np.float64)
    if torch.device(device).type == "cpu" or not low_precision:
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=what)
        return
    rel = float32_rel(device)
    err, ref = float(np.linalg.norm(a - e)), float(np.linalg.norm(e))
    assert err <= rel * max(ref, atol), f"{what}: ||device - cpu|| / ||cpu|| = {err / max(ref, 1e-300):.3g} > {rel:g}"


def scalar_rel(device: Union[str, torch.device], cpu_rel: float) -> float:
    """A relative tolerance for a scalar computed from float32 work on ``device``: the CPU's own value on the CPU."""
    return cpu_rel if torch.device(device).type == "cpu" else max(cpu_rel, float32_rel(device))

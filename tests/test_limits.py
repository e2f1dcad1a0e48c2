"""The numeric limits of the losses: defined once per language, and equal everywhere.

The reference (vaekern/reference.py) defines them for Python: LOGVAR_MAX, the clamp of the
KL's logvar; BCE_LOG_MIN, the clamp of the Bernoulli NLL's logs of probabilities;
BCE_GRAD_EPS, the floor of p*(1-p) in the probability gradient; CB_SERIES_MAX, below which
the continuous Bernoulli's log normalizer is a series (float64 math; the float32 threshold
has no reference counterpart and is tied across C++ and Triton); and HALF_LOG_2PI, the
Gaussian NLL's constant. C++ defines them once, in
csrc/conventions.h (included by csrc/cpu and csrc/cuda), and Triton in
vaekern/_triton/_common.py. These tests tie each of them to the reference, and the
reference's BCE limits to aten's F.binary_cross_entropy, whose behaviour they copy.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vaekern import reference

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HEADER = CSRC / "conventions.h"

# C++ name -> the reference's name.
CPP_NAMES = {
    "kLogvarMax": "LOGVAR_MAX", "kBceLogMin": "BCE_LOG_MIN", "kBceGradEps": "BCE_GRAD_EPS",
    "kCbSeriesMaxDouble": "CB_SERIES_MAX", "kHalfLog2Pi": "HALF_LOG_2PI",
}  # fmt: skip
# Triton's name -> the reference's name.
TRITON_NAMES = {
    "LOGVAR_MAX": "LOGVAR_MAX", "BCE_LOG_MIN": "BCE_LOG_MIN", "BCE_GRAD_EPS": "BCE_GRAD_EPS",
    "CB_SERIES_MAX_F64": "CB_SERIES_MAX", "HALF_LOG_2PI": "HALF_LOG_2PI",
}  # fmt: skip
# Limits of float32 math, which the float64 reference does not have: C++ name -> Triton's.
FLOAT_ONLY = {"kCbSeriesMaxFloat": "CB_SERIES_MAX_F32"}

_CONSTANT = re.compile(r"constexpr\s+double\s+(\w+)\s*=\s*([^;]+);")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
# The limits' values as C++ literals (60, 60.0, -100, -100.0f, 1e-12, ...), not part of
# another number or name.
_LITERAL = re.compile(r"(?<![\w.])(?:60|-\s*100|1e-12|0\.9189\d*)(?:\.0*)?f?(?![\w.])")


def cpp_constants() -> dict[str, float]:
    """The constexpr doubles of csrc/conventions.h, by name."""
    return {name: float(value.strip()) for name, value in _CONSTANT.findall(HEADER.read_text())}


def test_cpp_kl_columns_code_is_the_op_layers():
    """The one interface code in csrc/conventions.h: gaussian_kl's column reduction."""
    from vaekern._ops._common import KL_COLUMNS, REDUCTIONS

    (value,) = re.findall(r"constexpr\s+int64_t\s+kKlColumns\s*=\s*(\d+);", HEADER.read_text())
    assert int(value) == KL_COLUMNS and KL_COLUMNS not in REDUCTIONS.values()


def test_cpp_limits_equal_the_reference():
    constants = cpp_constants()
    assert set(constants) == set(CPP_NAMES) | set(FLOAT_ONLY), f"{HEADER.name} defines {sorted(constants)}"
    for cpp_name, ref_name in CPP_NAMES.items():
        assert constants[cpp_name] == getattr(reference, ref_name), (cpp_name, ref_name)


def test_cpp_sources_spell_no_limit_as_a_literal():
    """Outside csrc/conventions.h, code names the limits instead of repeating their values
    (comments may quote them: they cite the math)."""
    found = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in (".h", ".cpp", ".cu", ".cuh") or path == HEADER:
            continue
        code = _COMMENT.sub("", path.read_text())
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in _LITERAL.finditer(code)]
    assert not found, f"limits spelled as literals, use csrc/conventions.h: {found}"


def test_triton_limits_equal_the_reference():
    pytest.importorskip("triton")
    from vaekern._triton import _common

    # A missing name is a failure, not a skip: the Triton kernels must name their limits.
    missing = [name for name in (*TRITON_NAMES, *FLOAT_ONLY.values()) if not hasattr(_common, name)]
    assert not missing, f"vaekern._triton._common does not define {missing}"
    for name, ref_name in TRITON_NAMES.items():
        assert getattr(_common, name) == getattr(reference, ref_name), name
    constants = cpp_constants()
    for cpp_name, name in FLOAT_ONLY.items():
        assert constants[cpp_name] == getattr(_common, name), (cpp_name, name)


def test_op_layer_limits_equal_the_reference():
    """The op layer's differentiable KL gradient (double backward) clamps where the kernels
    do, and a learned scale's gradient (gaussian_nll.log_scale_grad) takes the NLL's own
    constant out of the loss."""
    from vaekern._ops import _common

    assert _common.LOGVAR_MAX == reference.LOGVAR_MAX
    assert _common.HALF_LOG_2PI == reference.HALF_LOG_2PI


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bce_limits_are_atens(dtype):
    """At p = 0, t = 1, F.binary_cross_entropy clamps log p at BCE_LOG_MIN and divides by its
    floor of p*(1-p): the loss is -BCE_LOG_MIN and the gradient -1/floor.

    aten holds that floor as a float32 constant, so in float64 it is float32(1e-12) =
    9.99999996e-13 rather than 1e-12: the float64 gradient is -1000000003995.8 where
    -1/BCE_GRAD_EPS would be -1e12 (a relative 4e-9, and only where p*(1-p) < 1e-12)."""
    p = torch.zeros((), dtype=dtype, requires_grad=True)
    t = torch.ones((), dtype=dtype)
    loss = F.binary_cross_entropy(p, t, reduction="sum")
    loss.backward()
    assert loss.item() == -reference.BCE_LOG_MIN
    floor = torch.tensor(reference.BCE_GRAD_EPS, dtype=torch.float32).to(dtype)
    assert p.grad == -1.0 / floor

"""Math operator objects (``nl.add``, ``nl.exp``, ...): usable as ``op=`` of ISA instructions and callable as the
``nki.language`` convenience functions.

Which operator an instruction accepts follows the two tables in ``aws-neuron-sdk:nki/api/nki.api.shared.rst``:
"Supported Math Operators for NKI ISA" (ALU ops: bitvec, arithmetic, arithmetic unary; the "Legal Reduction op"
column) and "Supported Activation Functions for NKI ISA" (``nisa.activation``). Math is float32 NumPy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

_SQRT2 = np.float32(np.sqrt(2.0))
_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 via Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 resolution near 1)."""
    x = np.asarray(x, dtype=np.float64)
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (s * (1.0 - poly * np.exp(-a * a))).astype(np.float32)


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _gelu(x):
    return (0.5 * x * (1.0 + _erf(x / _SQRT2))).astype(np.float32)


def _gelu_dx(x):
    pdf = np.exp(-0.5 * x.astype(np.float64) ** 2) / np.sqrt(2 * np.pi)
    return (0.5 * (1.0 + _erf(x / _SQRT2)) + x * pdf).astype(np.float32)


def _gelu_tanh(x):
    return (0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))).astype(np.float32)


def _gelu_sig(x):
    return (x * _sigmoid(np.float32(1.702) * x)).astype(np.float32)


def _gelu_sig_dx(x):
    s = _sigmoid(np.float32(1.702) * x)
    return (s + 1.702 * x * s * (1 - s)).astype(np.float32)


def _silu(x):
    return (x * _sigmoid(x)).astype(np.float32)


def _silu_dx(x):
    s = _sigmoid(x)
    return (s * (1 + x * (1 - s))).astype(np.float32)


def _softplus(x):
    return np.logaddexp(np.float32(0), x).astype(np.float32)


def _mish(x):
    return (x * np.tanh(_softplus(x))).astype(np.float32)


def _erf_dx(x):
    return (2.0 / np.sqrt(np.pi) * np.exp(-(x.astype(np.float64) ** 2))).astype(np.float32)


def _safe(fn):
    def run(*args):
        with np.errstate(all="ignore"):
            return fn(*args)

    return run


class MathOp:
    """One operator. ``kind``: 'arith' / 'bitvec' (binary ALU ops), 'unary' (ALU unary: abs, square, relu, rsqrt,
    reciprocal), 'act' (activation-table only) or 'lang' (``nki.language`` function only, not an ISA operator)."""

    def __init__(
        self,
        name: str,
        fn: Callable,
        kind: str,
        *,
        arity: int,
        reducible: bool = False,
        activation: bool = False,
        identity: float | None = None,
    ):
        self.name = name
        self.fn = _safe(fn)
        self.kind = kind
        self.arity = arity
        self.reducible = reducible  # "Legal Reduction op" column
        self.activation = activation  # listed in the activation function table
        self.identity = identity  # reduction identity
        self.wrapper: Callable | None = None  # set by language.py: the nl.<name>(...) convenience function

    def __call__(self, *args, **kwargs):
        if self.wrapper is None:
            raise TypeError(f"nl.{self.name} is only usable as an op= argument")
        return self.wrapper(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"nl.{self.name}"

    def reduce(self, x: np.ndarray, axis) -> np.ndarray:
        """Reduce ``x`` along ``axis`` with this operator."""
        ufunc = _REDUCERS.get(self.name)
        with np.errstate(all="ignore"):
            return ufunc.reduce(x, axis=axis) if ufunc is not None else np.subtract.reduce(x, axis=axis)


def _f32(fn):
    return lambda *a: np.asarray(fn(*a), dtype=np.float32)


def _cmp(fn):
    return lambda a, b: fn(a, b).astype(np.float32)


_BIN_ARITH = {
    "add": (np.add, True, 0.0),
    "subtract": (np.subtract, True, 0.0),
    "multiply": (np.multiply, True, 1.0),
    "maximum": (np.maximum, True, -np.inf),
    "minimum": (np.minimum, True, np.inf),
    "equal": (_cmp(np.equal), False, None),
    "not_equal": (_cmp(np.not_equal), False, None),
    "greater_equal": (_cmp(np.greater_equal), False, None),
    "greater": (_cmp(np.greater), False, None),
    "less_equal": (_cmp(np.less_equal), False, None),
    "less": (_cmp(np.less), False, None),
    "logical_and": (_cmp(lambda a, b: (a != 0) & (b != 0)), True, 1.0),
    "logical_or": (_cmp(lambda a, b: (a != 0) | (b != 0)), True, 0.0),
    "logical_xor": (_cmp(lambda a, b: (a != 0) ^ (b != 0)), True, 0.0),
    "power": (_f32(np.power), False, None),
    "abs_max": (_f32(lambda a, b: np.maximum(np.abs(a), np.abs(b))), False, None),
    "abs_min": (_f32(lambda a, b: np.minimum(np.abs(a), np.abs(b))), False, None),
}
_BITVEC = {
    "bitwise_and": (np.bitwise_and, True),
    "bitwise_or": (np.bitwise_or, True),
    "bitwise_xor": (np.bitwise_xor, True),
    "left_shift": (np.left_shift, False),
    "right_shift": (np.right_shift, False),
}
# Unary ALU operators (tensor_scalar with operand 0/None); the ones also in the activation table are marked there.
_UNARY = {
    "abs": _f32(np.abs),
    "square": _f32(np.square),
    "relu": _f32(lambda x: np.maximum(x, np.float32(0))),
    "rsqrt": _f32(lambda x: 1.0 / np.sqrt(x)),
    "reciprocal": _f32(lambda x: 1.0 / x),
}
# The activation table (nki.api.shared.rst, "Supported Activation Functions"); prelu's slope is not modelled.
_ACT = {
    "copy": _f32(lambda x: x),
    "square": _UNARY["square"],
    "sigmoid": _sigmoid,
    "relu": _UNARY["relu"],
    "prelu": _UNARY["relu"],
    "gelu": _gelu,
    "gelu_dx": _gelu_dx,
    "gelu_apprx_tanh": _gelu_tanh,
    "gelu_apprx_sigmoid": _gelu_sig,
    "gelu_apprx_sigmoid_dx": _gelu_sig_dx,
    "silu": _silu,
    "silu_dx": _silu_dx,
    "tanh": _f32(np.tanh),
    "softplus": _softplus,
    "mish": _mish,
    "erf": _erf,
    "erf_dx": _erf_dx,
    "exp": _f32(np.exp),
    "log": _f32(np.log),
    "sin": _f32(np.sin),
    "arctan": _f32(np.arctan),
    "sqrt": _f32(np.sqrt),
    "rsqrt": _UNARY["rsqrt"],
    "reciprocal": _UNARY["reciprocal"],
    "sign": _f32(np.sign),
    "abs": _UNARY["abs"],
}
# nki.language functions that are not ISA operators.
_LANG_UNARY = {
    "cos": _f32(np.cos),
    "tan": _f32(np.tan),
    "ceil": _f32(np.ceil),
    "floor": _f32(np.floor),
    "trunc": _f32(np.trunc),
    "negative": _f32(np.negative),
    "logical_not": _cmp(lambda a, _b: a == 0),
    "invert": np.invert,
}
_LANG_BINARY = {
    "divide": _f32(np.divide),
    "fmod": _f32(np.fmod),
    "mod": _f32(np.mod),
}
_REDUCERS = {
    "add": np.add,
    "subtract": np.add,
    "multiply": np.multiply,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "bitwise_and": np.bitwise_and,
    "bitwise_or": np.bitwise_or,
    "bitwise_xor": np.bitwise_xor,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}

OPS: dict[str, MathOp] = {}
for _n, (_fn, _red, _idn) in _BIN_ARITH.items():
    OPS[_n] = MathOp(_n, _fn, "arith", arity=2, reducible=_red, identity=_idn)
for _n, (_fn, _red) in _BITVEC.items():
    OPS[_n] = MathOp(_n, _fn, "bitvec", arity=2, reducible=_red)
for _n, _fn in _UNARY.items():
    OPS[_n] = MathOp(_n, _fn, "unary", arity=1, activation=_n in _ACT)
for _n, _fn in _ACT.items():
    if _n not in OPS:
        OPS[_n] = MathOp(_n, _fn, "act", arity=1, activation=True)
for _n, _fn in _LANG_UNARY.items():
    OPS[_n] = MathOp(_n, _fn, "bitvec" if _n == "invert" else "lang", arity=1)
for _n, _fn in _LANG_BINARY.items():
    OPS[_n] = MathOp(_n, _fn, "lang", arity=2)
# nl.bypass: "no-op operator ... to skip a computation stage" (tensor-scalar op0/op1).
OPS["bypass"] = MathOp("bypass", lambda a, b=None: a, "arith", arity=2)

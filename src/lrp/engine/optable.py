"""How each torch operation carries relevance, by the name of the function ``forward`` calls.

With relevance written as ``R = a * g`` (see ``docs/design.md``), the plain gradient already is the LRP rule
of every operation in ``GRADIENT``: re-indexing (``ROUTE``), maps that are linear in their one
input-dependent operand (proportional split at sums, average pooling), and maps that are piecewise linear
through the origin (ReLU, max-pooling winner-take-all). ``IDENTITY`` ops are elementwise non-linearities,
which pass relevance through unchanged (``R_in = R_out``). Layer ops get the composite's rules. Anything else
whose output depends on the input has no rule and stops ``explain`` with an error naming it.
"""

from __future__ import annotations

import torch

ROUTE = frozenset("""
view reshape view_as reshape_as flatten unflatten permute transpose t swapaxes swapdims movedim moveaxis
squeeze unsqueeze expand expand_as broadcast_to repeat repeat_interleave tile contiguous clone to type
float double half bfloat16 cpu cuda __getitem__ narrow select index_select gather take_along_dim split
split_with_sizes chunk unbind tensor_split hsplit vsplit dsplit cat concat concatenate stack hstack vstack dstack
pad roll flip fliplr flipud rot90 pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle
masked_fill where unfold fold __iter__ dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
identity interpolate upsample upsample_nearest masked_scatter index_fill diagonal real type_as
pack_padded_sequence pad_packed_sequence
""".split())

LINEAR = frozenset("""
add sub subtract __add__ __radd__ __sub__ __rsub__ neg __neg__ negative __pos__ positive sum mean nansum cumsum
avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d trace
""".split())

# linear only while at most one operand depends on the input (and, for division, not the divisor)
PRODUCT = frozenset("mul __mul__ __rmul__ multiply matmul __matmul__ __rmatmul__ mm bmm einsum dot "
                    "inner outer tensordot".split())
DIVISION = frozenset("div __truediv__ true_divide divide".split())

PIECEWISE_LINEAR = frozenset("""
relu leaky_relu prelu rrelu threshold abs max_pool1d max_pool2d max_pool3d max_pool1d_with_indices
max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices amax amin
max min maximum minimum
""".split())

GRADIENT = ROUTE | LINEAR | PIECEWISE_LINEAR

# The sign of an op's output, so that layer rules can skip looking for negative inputs (z+, alpha-beta and gamma
# have a faster form for inputs >= 0). NONNEGATIVE_OUTPUT: >= 0 whatever the input. KEEPS_SIGN: >= 0 when
# EVERY operand that is a value is >= 0 -- input-dependent tensors, and equally constants, parameters, buffers
# and numbers (parameters are frozen during explain, so "needs a gradient" says nothing about the sign):
#   name -> (tensor operands that are values: FIRST (the data; the other tensors give shapes, indices or a
#            dtype) or ALL (every tensor that is not boolean),
#            number operands that are values: ALL, or ((position, keyword), ...); the other numbers are
#            dimensions, sizes, paddings or shifts, whose sign says nothing)
# ``lrp.engine.signs`` applies it; SUBTRACT and DIVISION have checks of their own there. Left out on
# purpose: alpha dropout (training mode writes a negative value), bicubic resampling (it overshoots; see
# RESAMPLING_KEEPS_SIGN), anything whose value operands are not spelled out here.
NONNEGATIVE_OUTPUT = frozenset("relu abs".split())
FIRST, ALL = "first", "all"
_DATA = (FIRST, ())
KEEPS_SIGN: dict = {
    **{name: _DATA for name in """
view reshape view_as reshape_as flatten unflatten permute transpose t swapaxes swapdims movedim moveaxis
squeeze unsqueeze expand expand_as broadcast_to repeat repeat_interleave tile contiguous clone to type
float double half bfloat16 cpu cuda __getitem__ narrow select index_select gather take_along_dim split
split_with_sizes chunk unbind tensor_split hsplit vsplit dsplit roll flip fliplr flipud rot90 pixel_shuffle
pixel_unshuffle channel_shuffle native_channel_shuffle unfold fold dropout dropout1d dropout2d dropout3d identity
upsample_nearest interpolate upsample diagonal real type_as sum mean amax amin avg_pool1d adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_avg_pool3d max_pool1d max_pool2d max_pool3d max_pool1d_with_indices
max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices
""".split()},
    # avg_pool2d/3d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    **{name: (FIRST, ((6, "divisor_override"),)) for name in ("avg_pool2d", "avg_pool3d")},
    # pad(input, pad, mode, value): the pad widths may be negative (cropping)
    "pad": (FIRST, ((3, "value"),)),
    # index_fill(input, dim, index, value)
    "index_fill": (ALL, ((3, "value"),)),
    **{name: (ALL, ()) for name in "cat concat concatenate stack hstack vstack dstack masked_scatter max min "
                                   "maximum minimum".split()},
    # every number is a value here, alpha= included
    **{name: (ALL, ALL) for name in "add __add__ __radd__ mul __mul__ __rmul__ multiply where "
                                    "masked_fill".split()},
}
# x - alpha y: >= 0 when x >= 0 and alpha y <= 0;  x / y: >= 0 when x >= 0 and y > 0
SUBTRACT = frozenset("sub __sub__ subtract".split())
# interpolation modes whose weights are all >= 0 (not bicubic: its kernel has negative lobes)
RESAMPLING_KEEPS_SIGN = frozenset("nearest nearest-exact linear bilinear trilinear area".split())

# Normalisation statistics, held fixed (as AttnLRP holds LayerNorm's standard deviation fixed): the signal is
# divided or multiplied by them, so relevance passes through the signal. A statistic is a reduction (REDUCTION)
# of a power or root of the signal (MOMENT: computed without gradient, and an error if it meets the signal
# again before it is reduced), a power or root of a reduced signal, or a spread (SPREAD: var, std, norm).
MOMENT = frozenset("pow square rsqrt sqrt reciprocal float_power".split())
REDUCTION = frozenset("mean sum nansum".split())
SPREAD = frozenset("var std norm linalg_vector_norm linalg_norm".split())
# re-indexings and casts through which token ids stay token ids (each element is one of the input's ids)
ID_VIEWS = frozenset("""
view reshape view_as reshape_as flatten unflatten permute transpose t swapaxes swapdims movedim moveaxis squeeze
unsqueeze expand expand_as broadcast_to repeat repeat_interleave tile contiguous clone to type type_as long int
__getitem__ narrow select index_select gather take_along_dim split split_with_sizes chunk unbind tensor_split
flip fliplr flipud roll
""".split())

# elementwise changes of each token id (the result at a position comes from the id at that position), and
# tables read at the ids (``table[ids]``)
ID_VALUES = frozenset("""
masked_fill where clamp clamp_min clamp_max clip remainder fmod add sub mul __add__ __radd__ __sub__ __rsub__
__mul__ __rmul__ __mod__ abs neg __neg__ __getitem__ index_select gather take_along_dim
""".split())
# ops that read only a tensor's shape, dtype and device
SHAPE_ONLY = frozenset("zeros_like ones_like full_like empty_like rand_like randn_like randint_like new_zeros "
                       "new_ones new_full new_empty new_tensor".split())

# how a statistic may meet the signal: scaling it, so that the result scales no faster than the signal (a
# multiplier of degree <= 0, a divisor of degree >= 0; see ``Trace._fixed_among``)
MULTIPLIES = frozenset("mul __mul__ __rmul__ multiply".split())
SCALES = MULTIPLIES | DIVISION
# what a reduced signal stays through: re-indexing, casts and arithmetic (not layers or activations)
KEEPS_REDUCED = ROUTE | frozenset("add sub subtract __add__ __radd__ __sub__ __rsub__ mul __mul__ __rmul__ multiply "
                                  "div __truediv__ true_divide divide neg __neg__".split())

IDENTITY = frozenset("""
gelu silu sigmoid tanh elu selu celu softplus mish hardswish hardsigmoid relu6 hardtanh clamp clip
softsign tanhshrink logsigmoid log_softmax
""".split())

# activations whose output, multiplied with another activation, is a gate: relevance goes to the other factor
GATES = frozenset("sigmoid hardsigmoid".split())
ELEMENTWISE_PRODUCT = frozenset("mul __mul__ __rmul__ multiply".split())
# elementwise sums: the signal plus a moment of it joins the moment (``Trace.dispatch``)
SUMS = frozenset("add sub subtract __add__ __radd__ __sub__ __rsub__ rsub".split())
CASTS = frozenset("to float double half bfloat16 type_as contiguous clone".split())
# ops after which a moment is still an elementwise function of the signal it was computed from
ELEMENTWISE = IDENTITY | MOMENT | SUMS | MULTIPLIES | DIVISION | CASTS | frozenset(
    "neg __neg__ negative exp log abs __truediv__ __rtruediv__ __pow__ __rpow__ erf".split())
# a constant multiple of the signal keeps its origin (``0.5 * x`` in GPT-2's GELU)
SCALINGS = MULTIPLIES | DIVISION | CASTS | frozenset("neg __neg__ negative".split())

# output heads: a model whose output is one of these (over the class dimension, for the softmaxes), possibly
# followed by pure reshapes, is explained from the head's input (the logits)
HEADS = frozenset("sigmoid softmax log_softmax".split())
# re-indexings that keep the elements in order (``t.reshape(shape)`` undoes them)
RESHAPE = frozenset("view reshape view_as reshape_as flatten unflatten squeeze unsqueeze contiguous clone".split())

MAXPOOL = frozenset("""
max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices
adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d adaptive_max_pool1d_with_indices
adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices
""".split())

LAYERS = frozenset("linear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d".split())

BATCHNORM = "batch_norm"

# in-place methods that must keep running in place (they are not computations on the data)
KEEP_INPLACE = frozenset("requires_grad_ retain_grad share_memory_ record_stream set_ resize_ "
                         "resize_as_ detach_ uniform_ normal_ zero_ fill_".split())

INPLACE_DUNDER = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__",
                  "__itruediv__": "__truediv__", "__idiv__": "__truediv__"}


def out_of_place(name: str) -> str:
    """The op an in-place op runs as (``relu_`` -> ``relu``, ``__iadd__`` -> ``__add__``)."""
    if name in INPLACE_DUNDER:
        return INPLACE_DUNDER[name]
    if name.endswith("_") and not name.startswith("__") and name not in KEEP_INPLACE:
        return name[:-1]
    return name


_NAMES: dict = {}


def op_name(func) -> str:
    """Canonical name of an intercepted torch function (``F._max_pool2d`` -> ``max_pool2d``), cached."""
    try:
        return _NAMES[func]
    except (KeyError, TypeError):  # TypeError: an unhashable callable
        pass
    name = _name(func)
    if len(_NAMES) > 4096:  # functions made on the fly (partials, lambdas): do not grow without bound
        _NAMES.clear()
    try:
        _NAMES[func] = name
    except TypeError:
        pass
    return name


def _name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if isinstance(func, torch._ops.OpOverload):  # aten ops of exported programs: "conv2d.default" -> "conv2d"
        name = name.split(".")[0]
    if name.startswith("_") and not name.startswith("__"):
        name = name.lstrip("_")
    if name.startswith("boolean_dispatch"):  # pragma: no cover - defensive
        name = getattr(func, "__qualname__", name)
    return name

"""Composites: which rule each layer gets, written down as data.

A composite assigns a :class:`~lrp.rules.LayerRule` to every call of a dense or convolution layer. It looks
at, in this order of precedence (the first that matches wins):

1. ``by_name``: module-name patterns (``fnmatch`` globs such as ``"features.*"``; a layer's name is the
   dotted path of the module that runs it, ``"features.3"``);
2. ``by_position``: ``"first"`` (the layers that read the model input, through reshapes and indexing
   only; a warning says so when no layer does), ``"pixels"`` (the same layers, but only when the model input
   is an image: floating point with a channel and 2 or 3 spatial dimensions, i.e. ``x.ndim in (4, 5)``;
   for other inputs, such as tabular features or 1D signals, the key matches nothing and the layers get
   their ``by_type`` or ``default`` rule), ``"last"``, an integer index in the order the layers run (negative
   counts from the output), or a ``(start, stop)`` range of such indices; floats in a range are fractions of
   the number of layers, so ``(0.0, 1/3)`` is the lower third;
3. ``by_type``: a module class (matched with ``isinstance`` on the module that runs the layer) or an op kind,
   ``"linear"``, ``"conv"`` (convolutions of any dimension) or ``"conv_transpose"``;
4. ``default``.

Input rules that ignore the input's values (``Flat``, ``WSquare``) suit pixels, not features: on a tabular
model Flat would give every feature of a unit the same relevance. The named composites therefore put them at
``"pixels"``; ``ZBox`` (whose relevance depends on the values and on the bounds the user gave) stays at
``"first"``. ``Explanation.rules`` shows which rule each layer got.

Everything else the model runs is handled by the engine: activations pass relevance through, pooling,
additions and concatenations split it by contribution. ``maxpool="average"`` redistributes relevance at
max-pooling as if it were average pooling (``"max"``, the default, is winner-take-all). ``attention``
chooses how relevance crosses attention: ``"attnlrp"`` (default; AttnLRP, Achtibat et al. 2024: the uniform
rule at ``q k^T`` and ``A v``, the softmax's Taylor rule, which lets its implicit bias absorb some relevance)
or ``"cp"`` (CP-LRP, Ali et al. 2022: the attention weights are held fixed, relevance flows only through the
values, so bias-free transformers conserve relevance exactly).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from .rules import (AlphaBeta, Bound, Epsilon, Flat, Gamma, LayerRule, LRP0, ModuleRule, WSquare, ZBox,
                    ZPlus)

PositionKey = Union[str, int, tuple]


@dataclass
class LayerInfo:
    """What a composite knows about one layer call."""

    name: str  # dotted module path, with "#k" for the k-th repeated call
    module: Optional[torch.nn.Module]  # innermost module running the op
    kind: str  # "linear", "conv", "conv_transpose"
    index: int  # position in the order the layers run
    count: int  # number of layer calls in the forward pass
    first: bool  # reads the model input (directly or through reshapes and indexing; with several inputs, an
    #              image one, or without images a float one: see lrp.explain)
    image_input: bool = False  # it reads an image input: floating point, (N, C, H, W) or (N, C, D, H, W)

    @property
    def module_name(self) -> str:
        return self.name.split("#")[0]


@dataclass
class Composite:
    """Rules by name, position and type (see the module docstring for precedence)."""

    by_type: dict = field(default_factory=dict)
    by_position: dict = field(default_factory=dict)
    by_name: dict = field(default_factory=dict)
    default: LayerRule = field(default_factory=Epsilon)
    maxpool: str = "max"
    attention: str = "attnlrp"
    module_rules: dict = field(default_factory=dict)
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.maxpool not in ("max", "average"):
            raise ValueError(f"maxpool must be 'max' (winner-take-all) or 'average', got {self.maxpool!r}")
        if self.attention not in ("attnlrp", "cp"):
            raise ValueError(f"attention must be 'attnlrp' (AttnLRP, Achtibat et al. 2024) or 'cp' (CP-LRP, "
                             f"Ali et al. 2022: attention weights held fixed), got {self.attention!r}")
        for table in (self.by_type, self.by_position, self.by_name):
            for key, rule in table.items():
                if not isinstance(rule, LayerRule):
                    raise TypeError(f"composite entry {key!r} maps to {rule!r}, which is not a LayerRule "
                                    f"(use lrp.rules.Epsilon(), lrp.rules.ZPlus(), ...)")

    def rule_for(self, layer: LayerInfo) -> LayerRule:
        for pattern, rule in self.by_name.items():
            if fnmatch.fnmatchcase(layer.module_name, pattern) or fnmatch.fnmatchcase(layer.name, pattern):
                return rule
        for key, rule in self.by_position.items():
            if _position_matches(key, layer):
                return rule
        for key, rule in self.by_type.items():
            if isinstance(key, str):
                if key == layer.kind:
                    return rule
            elif layer.module is not None and isinstance(layer.module, key):
                return rule
        return self.default

    def rule_before_count(self, layer: LayerInfo) -> Optional[LayerRule]:
        """The layer's rule while the number of layers is not known yet (during the forward), or ``None`` when
        a position key that depends on it ("last", negative indices, fractions, open ranges) might decide."""
        if any(_counts(key) for key in self.by_position):
            return None
        return self.rule_for(layer)

def _index(value: Union[int, float, None], count: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, float):
        return int(round(value * count))
    return value + count if value < 0 else value


def _counts(key: PositionKey) -> bool:
    """Whether position ``key`` depends on the number of layers."""
    if isinstance(key, tuple):
        return len(key) != 2 or any(not isinstance(k, int) or k < 0 for k in key)
    return key == "last" or (isinstance(key, int) and key < 0) or not isinstance(key, (str, int))


def _position_matches(key: PositionKey, layer: LayerInfo) -> bool:
    if key == "first":
        return layer.first
    if key == "pixels":
        return layer.first and layer.image_input
    if key == "last":
        return layer.index == layer.count - 1
    if isinstance(key, int):
        return layer.index == _index(key, layer.count, 0)
    if isinstance(key, tuple) and len(key) == 2:
        start = _index(key[0], layer.count, 0)
        stop = _index(key[1], layer.count, layer.count)
        return start <= layer.index < stop
    raise ValueError(f"unknown position {key!r}: use 'first', 'pixels', 'last', an index or a (start, stop) range")


# --------------------------------------------------------------------------- named composites

def _lrp0(**_: Any) -> Composite:
    return Composite(default=LRP0(), name="lrp0")


def _epsilon(epsilon: float = 1e-6, **_: Any) -> Composite:
    return Composite(default=Epsilon(epsilon), name="epsilon")


def _epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6, **_: Any) -> Composite:
    return Composite(by_type={"conv": ZPlus(stabilizer), "conv_transpose": ZPlus(stabilizer),
                              "linear": Epsilon(epsilon)},
                     default=Epsilon(epsilon), name="epsilon-plus")


def _epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, **_: Any) -> Composite:
    comp = _epsilon_plus(epsilon, stabilizer)
    comp.by_position = {"pixels": Flat(stabilizer)}
    comp.name = "epsilon-plus-flat"
    return comp


def _need_bounds(name: str, low: Optional[Bound], high: Optional[Bound]) -> None:
    if low is None or high is None:
        raise ValueError(f"composite {name!r} applies the z^B rule to the input and needs its value range: "
                         f"lrp.composite({name!r}, low=..., high=...) with the lowest and highest input values "
                         f"(scalars or one per channel, in the units the model sees)")


def _epsilon_gamma_box(low: Optional[Bound] = None, high: Optional[Bound] = None, epsilon: float = 1e-6,
                       gamma: float = 0.25, stabilizer: float = 1e-6, **_: Any) -> Composite:
    _need_bounds("epsilon-gamma-box", low, high)
    assert low is not None and high is not None
    return Composite(by_type={"conv": Gamma(gamma, stabilizer), "conv_transpose": Gamma(gamma, stabilizer),
                              "linear": Epsilon(epsilon)},
                     by_position={"first": ZBox(low, high, stabilizer)},
                     default=Epsilon(epsilon), name="epsilon-gamma-box")


def _epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6, **_: Any) -> Composite:
    ab = AlphaBeta(2.0, 1.0, stabilizer)
    return Composite(by_type={"conv": ab, "conv_transpose": ab, "linear": Epsilon(epsilon)},
                     default=Epsilon(epsilon), name="epsilon-alpha2-beta1")


def _layered(low: Optional[Bound] = None, high: Optional[Bound] = None, gamma: float = 0.25,
             epsilon: float = 0.25, stabilizer: float = 1e-6, **_: Any) -> Composite:
    """Montavon et al. 2019 ("LRP: an overview"), section 10.3: z^B (or w^2 without bounds) at the input,
    gamma in the lower third of the layers, epsilon in the middle third, LRP-0 in the top third. w^2 ignores
    the input's values, so it applies to image inputs only ("pixels"); z^B applies to any input ("first")."""
    first = {"first": ZBox(low, high, stabilizer)} if low is not None and high is not None \
        else {"pixels": WSquare(stabilizer)}
    return Composite(by_position={**first, (0.0, 1 / 3): Gamma(gamma, stabilizer),
                                  (1 / 3, 2 / 3): Epsilon(epsilon), (2 / 3, None): LRP0()},
                     default=LRP0(), name="layered")


COMPOSITES: dict[str, Callable[..., Composite]] = {
    "lrp0": _lrp0,
    "epsilon": _epsilon,
    "epsilon-plus": _epsilon_plus,
    "epsilon-plus-flat": _epsilon_plus_flat,
    "epsilon-gamma-box": _epsilon_gamma_box,
    "epsilon-alpha2-beta1": _epsilon_alpha2_beta1,
    "layered": _layered,
}


def composite(name: str, *, maxpool: str = "max", attention: str = "attnlrp", **params: Any) -> Composite:
    """Build a named composite.

    ``params`` are the rule parameters (``epsilon``, ``gamma``, ``stabilizer``, ``low``, ``high``);
    ``maxpool="average"`` treats max-pooling as average pooling for relevance; ``attention="cp"`` holds
    attention weights fixed (CP-LRP) instead of the AttnLRP rules.
    Names: ``lrp0``, ``epsilon``, ``epsilon-plus``, ``epsilon-plus-flat``, ``epsilon-gamma-box``,
    ``epsilon-alpha2-beta1`` (the Zennit composites of the same name, same defaults) and ``layered``
    (Montavon et al. 2019: gamma low, epsilon middle, LRP-0 top, z^B or w^2 at the input). Flat
    (``epsilon-plus-flat``) and w^2 (``layered`` without bounds) apply only to image inputs (``"pixels"``).
    """
    key = name.lower().replace("_", "-")
    if key not in COMPOSITES:
        raise ValueError(f"unknown composite {name!r}; choose one of {', '.join(COMPOSITES)} "
                         f"or build lrp.Composite(...)")
    known = {"epsilon", "gamma", "stabilizer", "low", "high"}
    unknown = set(params) - known
    if unknown:
        raise TypeError(f"unknown composite parameter(s) {sorted(unknown)}; known: {sorted(known)}")
    comp = COMPOSITES[key](**params)
    comp.maxpool = maxpool
    comp.attention = attention
    comp.__post_init__()
    return comp


def resolve(spec: Union[str, Composite, None]) -> Composite:
    if spec is None:
        return composite("epsilon-plus-flat")
    if isinstance(spec, Composite):
        return spec
    if isinstance(spec, str):
        return composite(spec)
    raise TypeError(f"composite must be a name or an lrp.Composite, got {type(spec).__name__}")


# --------------------------------------------------------------------------- user module rules

_MODULE_RULES: dict[type, ModuleRule] = {}


def register_module_rule(module_type: type, rule: ModuleRule) -> None:
    """Tell lrp how relevance crosses a module of your own type.

    ``rule`` is ``lrp.rules.Pass()`` (elementwise: relevance passes through unchanged),
    ``lrp.rules.Gradient()`` (the module is linear or piecewise linear through the origin, e.g. a custom
    ReLU, so the gradient is its LRP-0 rule), or your subclass of :class:`lrp.rules.ModuleRule`.
    The module's inner operations are then not inspected.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, torch.nn.Module)):
        raise TypeError(f"register_module_rule needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, ModuleRule):
        raise TypeError(f"rule must be an lrp.rules.ModuleRule (Pass(), Gradient(), or your subclass), got {rule!r}")
    _MODULE_RULES[module_type] = rule


def module_rule_for(module: torch.nn.Module, comp: Composite) -> Optional[ModuleRule]:
    for table in (comp.module_rules, _MODULE_RULES):
        for module_type, rule in table.items():
            if isinstance(module, module_type):
                return rule
    return None

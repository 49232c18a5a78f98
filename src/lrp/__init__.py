"""lrp: Layer-wise Relevance Propagation for any PyTorch model, at the cost of a gradient.

>>> import lrp
>>> res = lrp.explain(model, x)                  # doctest: +SKIP
>>> res.relevance.shape == x.shape               # doctest: +SKIP
"""

from . import baselines, evaluate, language, models, rules
from .composites import Composite, composite, register_module_rule
from .errors import LRPError, RuleError, TargetError, UnsupportedOperationError
from .explain import Explainer, Explanation, explain
from .visualize import channel_grid, heatmap, is_multiband, overlay, token_html

__all__ = [
    "explain", "Explainer", "Explanation", "composite", "Composite", "register_module_rule", "rules", "models",
    "evaluate", "baselines", "language",
    "heatmap", "overlay", "token_html", "channel_grid", "is_multiband",
    "LRPError", "RuleError", "TargetError", "UnsupportedOperationError",
]
__version__ = "0.1.0"

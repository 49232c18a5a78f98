"""Evaluating explanations: perturbation curves, randomisation sanity checks, localisation and complexity
metrics, and a one-call comparison of LRP composites with baseline methods.

>>> from lrp import evaluate
>>> curve = evaluate.perturbation_curve(model, x, res.relevance, order="morf")   # doctest: +SKIP
>>> curve.aopc.mean()                                                             # doctest: +SKIP
>>> table = evaluate.compare(model, x, methods=["epsilon-plus-flat", "gradient", "random"])  # doctest: +SKIP
"""

from .compare import DEFAULT_METHODS, Comparison, compare
from .complexity import entropy, sparseness
from .localisation import pointing_game, relevance_mass_accuracy, relevance_rank_accuracy
from .methods import resolve_method
from .perturbation import REPLACEMENTS, Blur, PerturbationCurve, Uniform, perturbation_curve
from .plots import plot_curves, plot_randomisation
from .randomisation import RandomisationResult, parameter_layers, randomisation_check
from .similarity import relative_l2, spearman, ssim
from .tokens import TokenCurve, token_deletion_curve

__all__ = [
    "perturbation_curve", "PerturbationCurve", "Blur", "Uniform", "REPLACEMENTS",
    "randomisation_check", "RandomisationResult", "parameter_layers",
    "pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
    "sparseness", "entropy", "spearman", "ssim", "relative_l2",
    "compare", "Comparison", "DEFAULT_METHODS", "resolve_method", "plot_curves", "plot_randomisation",
    "token_deletion_curve", "TokenCurve",
]

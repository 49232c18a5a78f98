"""From a model spec to pictures and records, shared by ``lrp explain``, ``lrp serve`` and ``lrp evaluate``.

- :mod:`~lrp.pipeline.models`: load a model spec, its weights and class names; check a device;
- :mod:`~lrp.pipeline.inputs`: images, drawn digits, arrays and masks as the model reads them;
- :mod:`~lrp.pipeline.pipeline`: :class:`Pipeline` prepares inputs and explains them (:class:`Outcome`);
- :mod:`~lrp.pipeline.outputs`: heatmaps, overlays, band grids, feature bars and ``summary.csv`` rows;
- :mod:`~lrp.pipeline.text`: text models (the built-in ``spam`` classifier, or a local Hugging Face checkpoint folder
  ``hf:DIR``): a relevance per token, HTML and CSV.
"""

from ..errors import InputError, ModelError, one_line
from .inputs import (ARRAY_SUFFIXES, DEFAULT_PREPROCESSING, IMAGE_SUFFIXES, Preprocess, centre_digit,
                     expand_inputs, is_array_file, preprocess_for, read_array, read_mask)
from .models import MODEL_SPECS, LoadedModel, check_device, load_model, read_classes
from .pipeline import Outcome, Pipeline, Prepared, composite_names, needs_bounds, parse_target
from .text import TextOutcome, TextPipeline, is_hf_spec, is_text_spec

__all__ = [
    "Pipeline", "Prepared", "Outcome", "load_model", "LoadedModel", "check_device", "read_classes", "MODEL_SPECS",
    "Preprocess", "preprocess_for", "DEFAULT_PREPROCESSING", "centre_digit", "expand_inputs", "is_array_file",
    "read_array", "read_mask", "IMAGE_SUFFIXES", "ARRAY_SUFFIXES", "composite_names", "needs_bounds",
    "parse_target", "InputError", "ModelError", "one_line", "TextPipeline", "TextOutcome", "is_hf_spec",
    "is_text_spec",
]

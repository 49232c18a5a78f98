"""The JSON the web API takes and gives (pydantic models; they also document the API at ``/docs``)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from ..composites import COMPOSITES

Preprocessing = Literal["model", "digit"]


DESCRIPTIONS = {
    "model": "name of a served model (GET /api/models); default: the first",
    "composite": "LRP composite: " + ", ".join(COMPOSITES),
    "target": "class to explain: a class index or name; none or 'pred' for the predicted class",
    "preprocess": "'model': the model's preprocessing (as `lrp explain`); 'digit': like MNIST (the ink's bounding "
                  "box scaled to 20x20, its centre of mass at the centre of 28x28), for white-on-black drawings "
                  "and models reading 1x28x28",
    "invert": "invert the picture (dark ink on light paper -> white on black); default: as the model was served",
    "raw": "also return the raw relevance values (the shape of the model input)",
}


class ExplainOptions(BaseModel):
    """What to explain and how: the fields of ``POST /api/explain`` besides the input itself."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Optional[str] = Field(None, description=DESCRIPTIONS["model"])
    composite: str = Field("epsilon-plus-flat", description=DESCRIPTIONS["composite"])
    target: Union[StrictInt, StrictStr, None] = Field(None, description=DESCRIPTIONS["target"])
    preprocess: Preprocessing = Field("model", description=DESCRIPTIONS["preprocess"])
    invert: Optional[bool] = Field(None, description=DESCRIPTIONS["invert"])
    raw: bool = Field(False, description=DESCRIPTIONS["raw"])


class ExplainArrayRequest(ExplainOptions):
    """``POST /api/explain`` with ``Content-Type: application/json``."""

    array: list[Any] = Field(..., description="one input as nested lists of numbers: the model input (C, H, W) "
                                              "as the model reads it ((H, W) for one channel); with "
                                              "preprocess='digit' a drawing (H, W) with values in [0, 1]")


class ExplainForm(BaseModel):
    """``POST /api/explain`` as ``multipart/form-data`` (for the API docs: the fields of
    :class:`ExplainOptions`, as text, and the image)."""

    model_config = ConfigDict(protected_namespaces=())

    image: bytes = Field(..., description="the image file (PNG, JPEG, GIF, BMP, WebP, TIFF, PPM)")
    model: Optional[str] = Field(None, description=DESCRIPTIONS["model"])
    composite: str = Field("epsilon-plus-flat", description=DESCRIPTIONS["composite"])
    target: Optional[str] = Field(None, description=DESCRIPTIONS["target"])
    preprocess: Preprocessing = Field("model", description=DESCRIPTIONS["preprocess"])
    invert: Optional[bool] = Field(None, description=DESCRIPTIONS["invert"])
    raw: bool = Field(False, description=DESCRIPTIONS["raw"])


class Frame(BaseModel):
    """Where the model input lies in the picture sent, in that picture's pixels (``preprocess='digit'``)."""

    x: float
    y: float
    width: float
    height: float


class ExplainResponse(BaseModel):
    """The model's prediction and the LRP explanation of one class."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    composite: str
    prediction: int = Field(..., description="index of the predicted class")
    prediction_label: str
    probabilities: list[float] = Field(..., description="softmax of the model output, one per class")
    target: int = Field(..., description="index of the explained class")
    target_label: str
    score: float = Field(..., description="model output (logit) of the explained class: the relevance to share")
    relevance_sum: float = Field(..., description="relevance summed over the input (about `score` when conserved)")
    input_shape: list[int] = Field(..., description="shape of the input the model saw, without the batch")
    heatmap: Optional[str] = Field(None, description="the relevance as a PNG data URL (bwr: red for the class, "
                                                     "blue against, white neutral); None for non-image inputs")
    overlay: Optional[str] = Field(None, description="the heatmap over the input picture, PNG data URL")
    input_image: Optional[str] = Field(None, description="the input as the model saw it, PNG data URL")
    frame: Optional[Frame] = None
    relevance: Optional[list[Any]] = Field(None, description="raw relevance values (with raw=true)")
    elapsed_ms: float = Field(..., description="time to decode, explain and encode on the server")


class PreprocessingInfo(BaseModel):
    """How a model's images are preprocessed (the options of ``lrp explain``)."""

    size: Optional[int]
    crop: Optional[int]
    mean: Optional[list[float]]
    std: Optional[list[float]]
    grayscale: bool
    invert: bool


class ModelInfo(BaseModel):
    """One served model."""

    name: str
    kind: str = Field(..., description="mnist, torchvision, factory or exported")
    input_shape: Optional[list[int]] = Field(None, description="(C, H, W) when known")
    num_classes: Optional[int] = None
    classes: Optional[list[str]] = Field(None, description="class names, index order")
    drawable: bool = Field(..., description="reads 1x28x28 digits: usable on the drawing page")
    composites: list[str]
    default_composite: str
    preprocessing: PreprocessingInfo


class Limits(BaseModel):
    """The largest request body (bytes) and image side (pixels) the server takes."""

    max_bytes: int
    max_side: int


class ModelsResponse(BaseModel):
    """The answer of ``GET /api/models``."""

    models: list[ModelInfo]
    limits: Limits


class Sample(BaseModel):
    """A held-out MNIST digit (not used to train the built-in model)."""

    label: int
    array: list[list[float]] = Field(..., description="28x28 values in [0, 1], white on black")
    image: str = Field(..., description="the digit as a PNG data URL")


class ErrorResponse(BaseModel):
    """Every error: what is wrong, with the HTTP status."""

    error: str

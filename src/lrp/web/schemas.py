"""The JSON the web API takes and gives (pydantic models; they also document the API at ``/docs``)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from ..composites import COMPOSITES
from ..pipeline.text import TEXT_COMPOSITE

Preprocessing = Literal["model", "digit"]
Modality = Literal["image", "text", "vqa"]
MAX_TEXT_CHARS = 100_000  # characters of one text sent to POST /api/explain
MAX_QUESTION_CHARS = 300  # characters of one question sent to POST /api/vqa/explain
MAX_SEED = 2**32 - 1  # the largest scene seed of the VQA tab
VQA_COMPOSITE = "epsilon-plus-flat"  # lrp.vqa.ask's default


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


class CameraTiming(BaseModel):
    """Where a camera frame's time went on the server, in milliseconds."""

    decode_ms: float = Field(..., description="decoding the frame")
    explain_ms: float = Field(..., description="preparing the input, the model and LRP, the PNGs")
    render_ms: float = Field(..., description="drawing the heatmap over the frame and encoding it as JPEG")


class CameraResult(ExplainResponse):
    """The answer to one frame sent to the WebSocket ``/api/camera``: what ``POST /api/explain`` answers (without
    ``overlay``), and the frame with its heatmap over it."""

    type: Literal["result"] = "result"
    number: int = Field(..., description="the frame answered: 1 for the session's first frame, 2 for the next...")
    dropped: int = Field(..., description="frames of this session dropped so far: replaced by a newer frame before "
                                          "the model got to them")
    view: str = Field(..., description="the frame with its heatmap over the part the model saw (the rest darkened), "
                                       "JPEG data URL, the frame's size")
    width: int = Field(..., description="the frame's width in pixels")
    height: int = Field(..., description="the frame's height in pixels")
    seen: Frame = Field(..., description="the part of the frame the model saw, in its pixels (preprocess='digit': "
                                         "the 28x28 grid, which may reach past the frame's edges)")
    note: Optional[str] = Field(None, description="preprocess='digit': why the frame shows no digit (no ink found on "
                                                  "the paper); else None")
    timing: CameraTiming


class PreprocessingInfo(BaseModel):
    """How a model's images are preprocessed (the options of ``lrp explain``)."""

    size: Optional[int]
    crop: Optional[int]
    mean: Optional[list[float]]
    std: Optional[list[float]]
    grayscale: bool
    invert: bool
    scale: float = 1.0  # pixels in [0, scale] before mean and std (255 for Keras' caffe and raw conventions)
    bgr: bool = False  # channels reversed to BGR (Keras' caffe convention)


class ModelInfo(BaseModel):
    """One served model."""

    name: str
    modality: Modality = Field(
        default="image", description="what the model reads: 'image' (images and arrays, sent as {\"array\": ...} or "
                                     "an image file), 'text' (sent as {\"text\": ...}) or 'vqa' (a question about "
                                     "a Shapes VQA scene, sent to POST /api/vqa/explain)")
    kind: str = Field(..., description="image models: mnist, torchvision, factory or exported; text models: spam "
                                       "(the built-in spam classifier) or huggingface (hf:DIR); vqa: the built-in "
                                       "VQA model")
    input_shape: Optional[list[int]] = Field(None, description="(C, H, W) when known (vqa: the scene's); None for "
                                                               "text models")
    num_classes: Optional[int] = None
    classes: Optional[list[str]] = Field(None, description="class names, index order (vqa: the answers)")
    drawable: bool = Field(..., description="reads 1x28x28 digits: usable on the drawing page")
    composites: list[str] = Field(..., description="the composites this model can be explained with")
    default_composite: str
    preprocessing: Optional[PreprocessingInfo] = Field(
        default=None, description="image models: how images are prepared; None for text models")
    accuracy: Optional[float] = Field(
        default=None, description="held-out accuracy where known (the built-in spam model: 0.984 on 1,190 held-out "
                                  "mails; vqa: 0.962 on 1,000 held-out questions); None otherwise")
    max_tokens: Optional[int] = Field(default=None, description="text models: the most tokens the model reads")
    truncates: Optional[bool] = Field(
        default=None, description="text models: true when longer texts are cut to max_tokens (the rest is not "
                                  "read), false when they are refused")
    vocabulary: Optional[list[str]] = Field(default=None, description="vqa: the words a question may use")


class Limits(BaseModel):
    """The largest request body (bytes) and image side (pixels) the server takes; with a text model served, the
    longest text (characters)."""

    max_bytes: int
    max_side: int
    max_text_chars: Optional[int] = Field(
        default=None, description="the longest text POST /api/explain takes, in characters (only when a text model "
                                  "is served)")


class ModelsResponse(BaseModel):
    """The answer of ``GET /api/models``."""

    models: list[ModelInfo]
    limits: Limits


class Sample(BaseModel):
    """A held-out MNIST digit (not used to train the built-in model)."""

    label: int
    array: list[list[float]] = Field(..., description="28x28 values in [0, 1], white on black")
    image: str = Field(..., description="the digit as a PNG data URL")


class TextExample(BaseModel):
    """A held-out example text of a text model (for the spam model: a mail it was not trained on, as the subject,
    a blank line and the body)."""

    id: str = Field(..., description="the corpus's id of the mail")
    label: int = Field(..., description="index of the true class")
    label_name: str = Field(..., description="the true class: ham or spam")
    subject: str = Field(..., description="the first line (the mail's subject)")
    text: str
    group: str = Field("", description="the corpus folder: easy-ham-1, hard-ham-1, spam-2, ...")


class ExplainTextRequest(BaseModel):
    """``POST /api/explain`` with ``Content-Type: application/json`` for a text model:
    ``{"model": "spam", "text": "..."}``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), json_schema_extra={
        "examples": [{"model": "spam", "text": "Congratulations! You have won a FREE prize: click here to claim it"}]})

    text: StrictStr = Field(..., description=f"the text to explain: plain text, or for the spam model a raw e-mail "
                                             f"(its subject and body are read); not empty, at most "
                                             f"{MAX_TEXT_CHARS:,} characters",
                            json_schema_extra={"maxLength": MAX_TEXT_CHARS})
    model: Optional[str] = Field(None, description="name of a served text model (GET /api/models); default: the "
                                                   "first text model")
    target: Union[StrictInt, StrictStr, None] = Field(None, description="class to explain: a class index or name "
                                                                        "(spam, ham); none or 'pred' for the "
                                                                        "predicted class")
    composite: str = Field(TEXT_COMPOSITE, description="LRP composite (the text model's `composites` in GET "
                                                       "/api/models); default epsilon")
    words: bool = Field(True, description="also return the relevance per word (a word's tokens summed)")
    html: bool = Field(False, description="also return the token heatmap as an HTML fragment")


class TextWord(BaseModel):
    """One word of the text: its tokens' relevance summed."""

    word: str
    relevance: float
    tokens: list[int] = Field(..., description="positions of its tokens in `tokens`")


class ExplainTextResponse(BaseModel):
    """The prediction for a text and the LRP relevance of each of its tokens for the explained class."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    modality: Literal["text"] = "text"
    composite: str
    prediction: int = Field(..., description="index of the predicted class")
    prediction_label: str
    probabilities: list[float] = Field(..., description="softmax of the model output, one per class")
    target: int = Field(..., description="index of the explained class")
    target_label: str
    opposite_label: Optional[str] = Field(None, description="the class whose relevance is exactly minus this one "
                                                            "(the spam model: ham for spam, spam for ham)")
    score: float = Field(..., description="model output (logit) of the explained class: the relevance to share")
    relevance_sum: float = Field(..., description="relevance summed over the tokens (about `score` when conserved)")
    text: str = Field(..., description="the text as the model read it (for a raw e-mail: its subject and body)")
    tokens: list[str] = Field(..., description="the tokenizer's pieces, in order (byte-level BPE: 'Ġ' is a space, "
                                               "'Ċ' a line break)")
    relevance: list[float] = Field(..., description="one value per token: positive speaks for the explained class")
    spans: list[Optional[tuple[int, int]]] = Field(..., description="each token's characters [start, end) in "
                                                                    "`text`; None for special tokens or without "
                                                                    "offsets")
    special: list[bool] = Field(..., description="special tokens the tokenizer adds ([CLS], <s>...)")
    words: Optional[list[TextWord]] = Field(None, description="with words=true (the default): the relevance per "
                                                              "word; white space and special tokens are in none")
    truncated: bool = Field(..., description="the text was longer than the model reads: only `tokens` were read")
    max_tokens: Optional[int] = Field(None, description="the most tokens the model reads")
    html: Optional[str] = Field(None, description="with html=true: the token heatmap as an HTML fragment (words "
                                                  "merged with words=true)")
    elapsed_ms: float = Field(..., description="time to tokenize and explain on the server")


class VQAObject(BaseModel):
    """One object of a Shapes VQA scene, in the scene's pixels (64 x 64; x grows to the right)."""

    shape: str
    colour: str
    size: str = Field(..., description="small or large")
    x: float = Field(..., description="the centre's column, in the scene's pixels")
    y: float = Field(..., description="the centre's row, in the scene's pixels")
    visible_fraction: float = Field(..., description="the share of its pixels not covered by objects drawn later")


class VQASuggestion(BaseModel):
    """A question about the scene, generated from one of the templates, that the scene answers."""

    type: str = Field(..., description="the template: exist, query_colour, query_shape, count or relate")
    question: str
    answer: str = Field(..., description="the ground-truth answer")


class VQASceneResponse(BaseModel):
    """The answer of ``GET /api/vqa/scene``: a generated scene and questions to ask about it."""

    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(..., description="the VQA model the questions are for")
    seed: int = Field(..., description="the scene's seed: the same seed gives the same scene")
    size: int = Field(..., description="the scene's side in pixels, as the model reads it (64)")
    scale: int = Field(..., description="how many times `scene` is enlarged (nearest neighbour) for display")
    scene: str = Field(..., description="the scene as a PNG data URL, enlarged `scale` times (256 x 256)")
    background: str = Field(..., description="plain, noise, stripes or checker")
    objects: list[VQAObject] = Field(..., description="the objects, in drawing order (later ones on top)")
    questions: list[VQASuggestion] = Field(..., description="one generated question per template the scene allows")


class VQAExplainRequest(BaseModel):
    """``POST /api/vqa/explain``: a question about the scene of ``seed``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), json_schema_extra={
        "examples": [{"seed": 7, "question": "what colour is the triangle?"},
                     {"seed": 7, "question": "is there a red circle?", "target": "yes"}]})

    seed: StrictInt = Field(..., ge=0, le=MAX_SEED, description=f"the scene (GET /api/vqa/scene): 0 to {MAX_SEED}")
    question: StrictStr = Field(..., description=f"the question, in the model's words (GET /api/models: "
                                                 f"`vocabulary`); punctuation and case are ignored; at most "
                                                 f"{MAX_QUESTION_CHARS} characters",
                                json_schema_extra={"maxLength": MAX_QUESTION_CHARS})
    target: Union[StrictInt, StrictStr, None] = Field(None, description="the answer to explain: an answer word "
                                                                        "(yes, red, circle, three...) or its index; "
                                                                        "none or 'pred' for the model's answer")
    composite: str = Field(VQA_COMPOSITE, description="LRP composite: " + ", ".join(COMPOSITES))
    model: Optional[str] = Field(None, description="name of a served VQA model; default: the first")
    raw: bool = Field(False, description="also return the pixel relevance (64 x 64, colour channels summed)")


class VQAWord(BaseModel):
    """One word of the question as the model read it, with its relevance."""

    word: str
    relevance: float


class VQATruth(BaseModel):
    """The ground truth of a question that follows a template, and where the heatmap's positive relevance lies."""

    type: str = Field(..., description="the template the question follows")
    answer: str = Field(..., description="the correct answer")
    correct: bool = Field(..., description="whether the model's answer is the correct one")
    mask: str = Field(..., description="the objects the question refers to (the rest darkened), PNG data URL, "
                                       "enlarged as `scene`")
    mask_share: float = Field(..., description="the share of the scene's pixels in the mask (what a heatmap "
                                               "spread evenly would put in it)")
    mass_accuracy: Optional[float] = Field(
        None, description="the share of the positive pixel relevance that lies in the mask (relevance mass accuracy, "
                          "lrp.evaluate.relevance_mass_accuracy); None when the mask is empty (nothing answers to "
                          "the description: 'no', 'zero') or no pixel has positive relevance")


class VQAExplainResponse(BaseModel):
    """The model's answer to a question about a scene and the LRP relevance of each pixel and each word for the
    explained answer, from one ``lrp.vqa.ask`` call."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    modality: Literal["vqa"] = "vqa"
    composite: str
    seed: int
    question: str = Field(..., description="the question as sent")
    answer: str = Field(..., description="the model's answer")
    probability: float = Field(..., description="the probability of `answer`")
    prediction: int = Field(..., description="the index of `answer` in `answers`")
    answers: list[str] = Field(..., description="every answer the model knows, index order")
    probabilities: list[float] = Field(..., description="softmax of the model output, one per answer")
    explained: str = Field(..., description="the explained answer (`answer` unless a target was named)")
    target: int = Field(..., description="the index of `explained`")
    score: float = Field(..., description="the model output (logit) of the explained answer: the relevance to share")
    relevance_sum: float = Field(..., description="pixels' and words' relevance together (about `score`: the "
                                                  "model has no biases)")
    image_relevance_sum: float = Field(..., description="the pixels' share of it")
    question_relevance_sum: float = Field(..., description="the words' share of it")
    words: list[VQAWord] = Field(..., description="the question's words as the model read them (lower-cased, "
                                                  "punctuation dropped, 'color' read as 'colour'), each with its "
                                                  "relevance")
    scene: str = Field(..., description="the scene, PNG data URL, enlarged as GET /api/vqa/scene gives it")
    heatmap: str = Field(..., description="the pixel relevance (colour channels summed) as a PNG data URL, enlarged "
                                          "as `scene` (bwr: red for the answer, blue against, white neutral)")
    overlay: str = Field(..., description="the heatmap over the scene, PNG data URL")
    truth: Optional[VQATruth] = Field(None, description="when the question follows a template and its descriptions "
                                                        "pick out what they must: the ground truth")
    truth_note: Optional[str] = Field(None, description="else why there is no ground truth (the model answers "
                                                        "anyway)")
    relevance: Optional[list[list[float]]] = Field(None, description="with raw=true: the pixel relevance, 64 x 64")
    elapsed_ms: float = Field(..., description="time to explain and encode on the server")


class ErrorResponse(BaseModel):
    """Every error: what is wrong, with the HTTP status."""

    error: str

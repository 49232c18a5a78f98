"""The web demo's VQA model: generated Shapes VQA scenes with suggested questions, and questions about them
answered and explained over the pixels and the words (:func:`lrp.vqa.ask`).

Synchronous, like :mod:`lrp.web.service`: runs in a worker thread and raises
:class:`~lrp.web.service.ServiceError` with the HTTP status to answer.
"""

from __future__ import annotations

import random
import threading
import time
from functools import lru_cache
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image

from .. import visualize
from ..composites import COMPOSITES, composite
from ..datasets import shapes_vqa
from ..datasets.shapes_vqa import ANSWERS, QUESTION_TYPES, VOCABULARY, NotAnswerable, Scene
from ..errors import InputError, LRPError, ModelError, TargetError, one_line
from ..evaluate.localisation import relevance_mass_accuracy
from ..pipeline.pipeline import needs_bounds, parse_target
from ..vqa import VQANet, ask, vqa
from .schemas import (MAX_QUESTION_CHARS, MAX_SEED, VQA_COMPOSITE, VQAExplainRequest, VQAExplainResponse, VQAObject,
                      VQASceneResponse, VQASuggestion, VQATruth, VQAWord)
from .service import ServedModel, ServiceError, enlarge, png_data_url
from .text_service import ServedText

VQA_SPEC = "vqa"  # the built-in VQA model (lrp.models.vqa)
WARM_UP_SEED, WARM_UP_QUESTION = 0, "is there a red circle?"
SUGGESTION_STREAM = 2  # suggested questions draw from the generator [seed, 2] (make_scene draws from [seed, 1])


def is_vqa_spec(spec: Optional[str]) -> bool:
    """Whether a model spec names the VQA model."""
    return spec == VQA_SPEC


@lru_cache(maxsize=64)
def scene_of(seed: int) -> Scene:
    """The scene of ``seed`` (:func:`lrp.datasets.shapes_vqa.make_scene`); 422 for a seed out of range."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ServiceError(422, f"seed: {seed!r} is not a scene: seeds are whole numbers from 0 to {MAX_SEED}")
    return shapes_vqa.make_scene(seed)


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def suggestions(scene: Scene) -> list[VQASuggestion]:
    """One generated question per template that the scene allows, with its answer (seeded by the scene)."""
    return [VQASuggestion(type=q.type, question=q.text, answer=q.answer)
            for q in shapes_vqa.questions_about(scene, SUGGESTION_STREAM)]


def picture(array: np.ndarray) -> str:
    """An ``(H, W, 3)`` uint8 image (or a PIL image) as a PNG data URL, enlarged for display."""
    return png_data_url(enlarge(Image.fromarray(array) if isinstance(array, np.ndarray) else array))


class ServedVQA:
    """The built-in VQA model (:class:`~lrp.vqa.VQANet`) as ``lrp serve`` serves it: warmed up, explained one
    request at a time. It is small and runs on the CPU."""

    modality = "vqa"
    drawable = False
    kind = "vqa"

    def __init__(self, model: VQANet, name: str = VQA_SPEC) -> None:
        self.model = model.eval()
        self.name = name
        self.classes = list(ANSWERS)
        self.vocabulary = list(VOCABULARY[1:])  # the words a question may use (not the padding)
        self.composites = list(COMPOSITES)
        self.accuracy: Optional[float] = model.accuracy
        self._composites: dict[str, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec: str = VQA_SPEC) -> "ServedVQA":
        """``vqa``: the built-in model (``lrp.models.vqa()``); raises ``ModelError`` for other specs."""
        if not is_vqa_spec(spec):
            raise ModelError(f"unknown VQA model {spec!r}: the built-in one is {VQA_SPEC!r}")
        model, _ = vqa()
        return cls(model)

    @property
    def input_shape(self) -> list[int]:
        return [3, self.model.image_size, self.model.image_size]

    def warm_up(self) -> None:
        """Explain a question twice, so that the first request is as fast as the others."""
        scene = scene_of(WARM_UP_SEED)
        for _ in range(2):
            ask(scene.image, WARM_UP_QUESTION, composite=self._composite(VQA_COMPOSITE), model=self.model)

    def _composite(self, name: str) -> Any:
        """The composite ``name`` as :func:`lrp.vqa.ask` takes it: the name, or for z^B at the input a composite
        with the scene's value range (pixels in [0, 1])."""
        key = name.lower().replace("_", "-")
        if key not in COMPOSITES:
            raise ServiceError(422, f"unknown composite {name!r}; choose one of {', '.join(COMPOSITES)}")
        if not needs_bounds(key):
            return key
        if key not in self._composites:
            self._composites[key] = composite(key, low=0.0, high=1.0)
        return self._composites[key]

    def scene(self, seed: Optional[int] = None) -> VQASceneResponse:
        """The answer of ``GET /api/vqa/scene``: the scene of ``seed`` (a random one without), enlarged, with its
        objects and suggested questions."""
        scene = scene_of(random_seed() if seed is None else seed)
        shown = enlarge(Image.fromarray(scene.image))
        return VQASceneResponse(
            model=self.name, seed=scene.seed, size=scene.image.shape[1], scale=shown.width // scene.image.shape[1],
            scene=png_data_url(shown), background=scene.background,
            objects=[VQAObject(shape=o.shape, colour=o.colour, size=o.size, x=o.x, y=o.y,
                               visible_fraction=o.visible_fraction) for o in scene.objects],
            questions=suggestions(scene))

    def target(self, spec: Union[int, str, None]) -> Optional[int]:
        """The answer to explain as an index (None: the model's answer); 400 for what is not an answer."""
        try:
            index = parse_target(spec.strip().lower() if isinstance(spec, str) else spec, self.classes)
        except TargetError:
            index = -1
        if index is not None and not 0 <= index < len(self.classes):
            raise ServiceError(400, f"target: {spec!r} is not an answer of the model; answers (or their index, 0 to "
                                    f"{len(self.classes) - 1}): {', '.join(self.classes)}")
        return index

    def explain(self, request: VQAExplainRequest) -> VQAExplainResponse:
        """Check the question and the options, answer and explain, as ``POST /api/vqa/explain`` does."""
        started = time.perf_counter()
        text = request.question
        if len(text) > MAX_QUESTION_CHARS:
            raise ServiceError(422, f"question: {len(text):,} characters is too long: at most {MAX_QUESTION_CHARS}. "
                                    f"Questions are short and use the model's {len(VOCABULARY) - 1} words: "
                                    f"{', '.join(VOCABULARY[1:])}; they look like "
                                    f"{', '.join(repr(shapes_vqa.example_question(t)) for t in QUESTION_TYPES)}")
        scene = scene_of(request.seed)
        comp = self._composite(request.composite)
        target = self.target(request.target)
        with self._lock:  # one question at a time per model (the model and its explainers are shared)
            try:
                out = ask(scene.image, text, target=target, composite=comp, model=self.model)
            except InputError as exc:  # unknown words, no words: the message names the vocabulary
                raise ServiceError(422, f"question: {exc}") from None
            except (ModelError, LRPError) as exc:
                raise ServiceError(422, f"model {self.name!r} cannot be explained: {exc}") from None
            except Exception as exc:
                raise ServiceError(422, f"model {self.name!r} failed on this question: {one_line(exc)}") from None
        probabilities = out.probabilities
        pixels = out.image.detach().cpu().numpy()
        words = out.words.detach().cpu()
        truth, note = _truth(scene, text, out.answer, pixels)
        image_sum, question_sum = float(pixels.sum()), float(words.sum())
        return VQAExplainResponse(
            model=self.name, composite=request.composite.lower().replace("_", "-"), seed=scene.seed, question=text,
            answer=out.answer, probability=out.probability, prediction=self.classes.index(out.answer),
            answers=self.classes, probabilities=probabilities, explained=out.explained,
            target=self.classes.index(out.explained), score=out.score,
            relevance_sum=image_sum + question_sum, image_relevance_sum=image_sum, question_relevance_sum=question_sum,
            words=[VQAWord(word=w, relevance=float(r)) for w, r in zip(out.tokens, words.tolist())],
            scene=picture(scene.image), heatmap=png_data_url(enlarge(visualize.heatmap(pixels, "bwr"))),
            overlay=png_data_url(enlarge(visualize.overlay(Image.fromarray(scene.image), pixels, "bwr"))),
            truth=truth, truth_note=note, relevance=pixels.tolist() if request.raw else None,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 3))


def _truth(scene: Scene, text: str, answer: str, pixels: np.ndarray) -> tuple[Optional[VQATruth], Optional[str]]:
    """The ground truth of a question that follows a template, or why there is none."""
    try:
        q = shapes_vqa.ask(scene, text)
    except NotAnswerable as exc:
        return None, str(exc)
    mask = np.array(q.mask)
    mass = None
    if mask.any():
        value = float(relevance_mass_accuracy(torch.from_numpy(pixels)[None, None], torch.from_numpy(mask)[None])[0])
        mass = None if np.isnan(value) else value
    shaded = np.where(mask[..., None], scene.image, scene.image // 4).astype(np.uint8)
    return VQATruth(type=q.type, answer=q.answer, correct=q.answer == answer, mask=picture(shaded),
                    mask_share=float(mask.mean()), mass_accuracy=mass), None


Served = Union[ServedModel, ServedText, ServedVQA]  # a model lrp serve serves

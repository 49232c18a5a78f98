"""Shapes VQA: procedural scenes of coloured shapes, template questions about them with one-word answers, and for
each question a pixel mask of the objects it refers to -- the ground truth for an explanation's relevance.

A scene (:func:`make_scene`) is a ``64 x 64`` RGB image (``uint8``) of 2 to 6 objects on a plain or textured grey
background. Shapes: circle, square, triangle, diamond; colours: red, green, blue, yellow, purple, cyan (each
object's colour jittered by up to +-12 per channel); sizes: small and large. Objects may overlap (later ones are
drawn on top), but every object keeps at least 60% of its pixels visible, centres are at least 8 pixels apart,
and objects of the same colour never touch, so that each object stays countable and nameable.

Questions come from five templates (:data:`QUESTION_TYPES`):

=============== ===================================== ============================ ===============================
type            example                               answers                      ground-truth mask
=============== ===================================== ============================ ===============================
``exist``       is there a red circle?                yes / no                     the red circles; empty for "no"
``query_colour`` what colour is the square?           a colour                     the square (the only one)
``query_shape`` what shape is the blue object?        a shape                      the blue object (the only one)
``count``       how many triangles are there?         zero ... six                 all triangles; empty for "zero"
``relate``      is the circle left of the red square? yes / no                     both objects
=============== ===================================== ============================ ===============================

The mask holds the *visible* pixels of the referred objects (an occluded part belongs to the object in front).
When nothing in the scene answers to the question's description ("no" to ``exist``, "zero" to ``count``) the
mask is empty: the evidence for the answer is an absence, which no pixel region marks. Such questions
(:attr:`Question.localisable` false) are left out of localisation metrics; about 30% of ``exist`` and 15% of
``count`` questions. ``query_colour`` and ``query_shape`` are asked only about an object that the description
picks out uniquely; ``relate`` refers to each object by its shape, or by colour and shape where the shape alone
is ambiguous, and only when the two centres are at least :data:`MIN_GAP` pixels apart horizontally.

Everything is seeded: :func:`sample` (``seed``) gives one scene and one question, the same bytes on every run
and independent of the global random state (a private ``numpy.random.Generator``; geometry in correctly rounded
floating point, textures in integers). The question type is ``QUESTION_TYPES[seed % 5]``. Seeds below
:data:`TEST_SEED` are for training; the held-out test set is :func:`test_set` (seeds ``1_000_000`` to
``1_000_999``), which :func:`digest` fingerprints.

Questions are read word by word with a fixed vocabulary (:data:`VOCABULARY`; punctuation ignored, ``color``
read as ``colour``); :func:`encode_question` turns a question into ids and names any unknown word
(:class:`UnknownWordError`, with the vocabulary and close matches) or refuses an empty one
(:class:`EmptyQuestionError`). :func:`ask` answers a question written by a person about a scene, with its
mask, when it follows one of the templates.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import InputError

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 210, 40),
       "purple": (150, 60, 200), "cyan": (50, 210, 220)}
SIZES = {"small": 5.0, "large": 8.0}  # the radius of a circle; the other shapes have about its area
COUNTS = ("zero", "one", "two", "three", "four", "five", "six")
MIN_OBJECTS, MAX_OBJECTS = 2, 6
MIN_VISIBLE = 0.6  # the least visible fraction of an object's pixels
MIN_DISTANCE = 8.0  # the least distance between two objects' centres
MIN_GAP = 8.0  # relate questions: the two centres at least this many pixels apart horizontally
COLOUR_JITTER = 12
BACKGROUNDS = ("plain", "noise", "stripes", "checker")

QUESTION_TYPES = ("exist", "query_colour", "query_shape", "count", "relate")
TEMPLATES = {
    "exist": "is there a {colour} {shape}?",
    "query_colour": "what colour is the {shape}?",
    "query_shape": "what shape is the {colour} object?",
    "count": "how many {shape}s are there?",
    "relate": "is the {a} {direction} of the {b}?",
}
ANSWERS: tuple[str, ...] = ("yes", "no") + COLOURS + SHAPES + COUNTS

PAD = "<pad>"
PAD_ID = 0
VOCABULARY: tuple[str, ...] = (PAD, "is", "there", "a", "what", "colour", "shape", "the", "object", "how", "many",
                               "are", "left", "right", "of") + COLOURS + SHAPES + tuple(s + "s" for s in SHAPES)
ALIASES = {"color": "colour"}

TEST_SEED = 1_000_000  # seeds [0, TEST_SEED) train, [TEST_SEED, ...) are held out
TEST_SIZE = 1000


# ----------------------------------------------------------------------------- words

class UnknownWordError(InputError):
    """A question uses words outside :data:`VOCABULARY`; ``words`` lists them."""

    def __init__(self, words: Sequence[str], text: str):
        self.words = list(words)
        hints = []
        for w in self.words:
            close = difflib.get_close_matches(w, list(VOCABULARY[1:]) + list(ALIASES), n=2, cutoff=0.6)
            if close:
                hints.append(f"{w!r}: did you mean {' or '.join(repr(c) for c in close)}?")
        plural = "s" if len(self.words) > 1 else ""
        super().__init__(
            f"unknown word{plural} {', '.join(repr(w) for w in self.words)} in the question {text!r}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + f". The model knows {len(VOCABULARY) - 1} words: {', '.join(VOCABULARY[1:])}; questions look like "
              f"{', '.join(repr(example_question(t)) for t in QUESTION_TYPES)}")


class EmptyQuestionError(InputError):
    """A question without words."""

    def __init__(self, text: str = ""):
        super().__init__(f"the question {text!r} has no words; ask e.g. "
                         f"{', '.join(repr(example_question(t)) for t in QUESTION_TYPES)} "
                         f"(words: {', '.join(VOCABULARY[1:])})")


def example_question(qtype: str) -> str:
    """One question of each type, for hints."""
    return {"exist": "is there a red circle?", "query_colour": "what colour is the square?",
            "query_shape": "what shape is the blue object?", "count": "how many triangles are there?",
            "relate": "is the circle left of the square?"}[qtype]


def tokenize(text: str) -> list[str]:
    """The words of a question: lower-cased, split at white space and at ``? . , ! ; :`` (which are dropped),
    aliases replaced (``color`` -> ``colour``). Nothing is checked against the vocabulary here."""
    if not isinstance(text, str):
        raise TypeError(f"a question must be a str, got {type(text).__name__}")
    return [ALIASES.get(w, w) for w in re.findall(r"[^\s?.,!;:]+", text.lower())]


_INDEX = {w: i for i, w in enumerate(VOCABULARY)}


def encode_question(text: str) -> list[int]:
    """The ids of a question's words (:func:`tokenize`, then :data:`VOCABULARY`): raises
    :class:`EmptyQuestionError` for a question without words and :class:`UnknownWordError`, naming every
    unknown word, close matches and the vocabulary, for words the model does not know."""
    words = tokenize(text)
    if not words:
        raise EmptyQuestionError(text)
    unknown = list(dict.fromkeys(w for w in words if w not in _INDEX or w == PAD))
    if unknown:
        raise UnknownWordError(unknown, text)
    return [_INDEX[w] for w in words]


def decode_question(ids: Iterable[int]) -> list[str]:
    """The words of a row of ids, padding dropped."""
    return [VOCABULARY[int(i)] for i in ids if int(i) != PAD_ID]


# ----------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: ``shape``, ``colour``, ``size`` (``"small"``/``"large"``), its centre ``x``, ``y``
    in pixels (``x`` grows to the right), the ``rgb`` it is painted in, and ``visible``: its visible pixels, a
    boolean ``(H, W)`` mask (what is not covered by objects drawn later)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    rgb: tuple[int, int, int]
    visible: np.ndarray = field(repr=False, compare=False)
    visible_fraction: float = 1.0

    @property
    def area(self) -> int:
        return int(self.visible.sum())


@dataclass(frozen=True)
class Scene:
    """An image ``(H, W, 3)`` ``uint8`` and its objects, in drawing order (later ones on top)."""

    seed: int
    image: np.ndarray = field(repr=False, compare=False)
    objects: tuple[SceneObject, ...]
    background: str

    def find(self, colour: Optional[str] = None, shape: Optional[str] = None) -> list[int]:
        """The indices of the objects of that colour and/or shape."""
        return [i for i, o in enumerate(self.objects)
                if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]

    def mask(self, indices: Iterable[int]) -> np.ndarray:
        """The visible pixels of these objects, ``(H, W)`` bool."""
        out = np.zeros(self.image.shape[:2], dtype=bool)
        for i in indices:
            out |= self.objects[i].visible
        return out


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The centres of the pixels' rows and columns, ``(size, 1)`` and ``(1, size)``."""
    if size not in _GRIDS:
        centres = np.arange(size, dtype=np.float64) + 0.5
        _GRIDS[size] = centres[:, None], centres[None, :]
    return _GRIDS[size]


_SQRT3 = float(np.sqrt(3.0))  # correctly rounded: the same on every machine


def _extent(radius: float) -> float:
    """How far an object can reach from its centre (the triangle's apex)."""
    return 1.4 * radius


def shape_mask(shape: str, x: float, y: float, radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """The pixels (by their centres) of a shape centred at ``(x, y)``: a circle of ``radius``, a square of half
    side ``0.85 radius``, a diamond of half diagonal ``1.2 radius``, an upright equilateral triangle of
    circumradius ``1.4 radius`` (areas ``3.1``, ``2.9``, ``2.9``, ``2.5 radius^2``)."""
    yy, xx = _pixel_centres(size)
    dx, dy = xx - x, yy - y
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = 0.85 * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.2 * radius
    if shape == "triangle":
        r = 1.4 * radius  # apex at y - r, base at y + r / 2
        return (dy <= r / 2) & (_SQRT3 * np.abs(dx) <= dy + r)
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _background(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A grey background, ``int32`` ``(H, W)``: plain, or textured with noise, stripes or a checkerboard."""
    kind = BACKGROUNDS[int(rng.choice(4, p=[0.4, 0.2, 0.2, 0.2]))]
    grey = int(rng.integers(95, 151))
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "plain":
        return kind, np.full((size, size), grey, dtype=np.int32)
    if kind == "noise":
        return kind, grey + rng.integers(-14, 15, (size, size)).astype(np.int32)
    amplitude = int(rng.integers(8, 19))
    period = int(rng.integers(3, 7))
    if kind == "stripes":
        a, b = [(1, 0), (0, 1), (1, 1), (1, -1)][int(rng.integers(0, 4))]
        on = ((xx * a + yy * b + size) // period) % 2
    else:
        on = (xx // period + yy // period) % 2
    return kind, (grey + amplitude * (2 * on - 1)).astype(np.int32)


def _scene(rng: np.random.Generator, seed: int, size: int = IMAGE_SIZE) -> Scene:
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    background, grey = _background(rng, size)
    placed: list[tuple[str, str, str, float, float, np.ndarray]] = []  # shape, colour, size, x, y, full mask
    visible: list[np.ndarray] = []
    least: list[float] = []  # the fewest pixels each placed object must keep visible
    for _ in range(n):
        for _attempt in range(60):
            shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
            colour = COLOURS[int(rng.integers(0, len(COLOURS)))]
            size_name = ("small", "large")[int(rng.integers(0, 2))]
            radius = SIZES[size_name]
            margin = _extent(radius) + 1.0
            x, y = (float(v) for v in rng.uniform(margin, size - margin, 2))
            if any((x - p[3]) ** 2 + (y - p[4]) ** 2 < MIN_DISTANCE ** 2 for p in placed):
                continue  # two objects on one spot could not be told apart or counted
            full = shape_mask(shape, x, y, radius, size)
            near = _dilate(full)
            if any(p[1] == colour and np.any(near & p[5]) for p in placed):
                continue  # objects of one colour would merge into one blob
            left = [v & ~full for v in visible]
            if any(np.count_nonzero(v) < k for v, k in zip(left, least)):
                continue  # it would hide too much of an object below
            placed.append((shape, colour, size_name, x, y, full))
            visible = left + [full]
            least.append(MIN_VISIBLE * np.count_nonzero(full))
            break
        else:
            break  # the scene is full: keep the objects placed so far (at least one)
    image = np.repeat(grey[:, :, None], 3, axis=2)
    objects = []
    for (shape, colour, size_name, x, y, full), vis in zip(placed, visible):
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
        rgb = np.clip(np.array(RGB[colour]) + jitter, 0, 255)
        image[full] = rgb
        objects.append(SceneObject(shape, colour, size_name, x, y, (int(rgb[0]), int(rgb[1]), int(rgb[2])), vis,
                                   np.count_nonzero(vis) / np.count_nonzero(full)))
    if background == "noise":  # the texture lies over the objects too
        image = image + rng.integers(-8, 9, (size, size, 1)).astype(np.int32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    image.setflags(write=False)
    for o in objects:
        o.visible.setflags(write=False)
    return Scene(seed, image, tuple(objects), background)


def make_scene(seed: int) -> Scene:
    """A scene of its own seed (not the scene of :func:`sample` with that seed, which also draws a question)."""
    return _scene(np.random.default_rng([seed, 1]), seed)


# ----------------------------------------------------------------------------- questions

@dataclass(frozen=True)
class Question:
    """A question about a scene with its ground truth.

    ``text`` (as asked), ``tokens`` (its words), ``ids`` (their vocabulary ids), ``type`` (one of
    :data:`QUESTION_TYPES`), ``answer`` (one word of :data:`ANSWERS`), ``referred`` (the indices of the objects the
    question refers to), ``mask`` (their visible pixels, ``(H, W)`` bool; empty when no object answers to the
    description, see the module docstring), ``scene``."""

    text: str
    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    type: str
    answer: str
    referred: tuple[int, ...]
    mask: np.ndarray = field(repr=False, compare=False)
    scene: Scene = field(repr=False, compare=False)

    @property
    def answer_id(self) -> int:
        return ANSWERS.index(self.answer)

    @property
    def image(self) -> np.ndarray:
        return self.scene.image

    @property
    def objects(self) -> tuple[SceneObject, ...]:
        return self.scene.objects

    @property
    def localisable(self) -> bool:
        """Whether the mask holds any pixel (localisation metrics need one)."""
        return bool(self.mask.any())


class NotAnswerable(InputError):
    """A question that follows no template, or whose description does not pick out one object in the scene."""


def _ref(colour: Optional[str], shape: str) -> str:
    return f"{colour} {shape}" if colour else shape


def render(qtype: str, args: dict) -> str:
    """The text of a question of a type with its arguments."""
    if qtype == "relate":
        return TEMPLATES[qtype].format(a=_ref(*args["a"]), b=_ref(*args["b"]), direction=args["direction"])
    return TEMPLATES[qtype].format(**args)


def ground_truth(scene: Scene, qtype: str, args: dict) -> tuple[str, tuple[int, ...]]:
    """The answer and the referred objects of a question (type and arguments) about ``scene``; raises
    :class:`NotAnswerable` when a description that must pick out one object does not."""
    if qtype == "exist":
        found = scene.find(args["colour"], args["shape"])
        return ("yes" if found else "no"), tuple(found)
    if qtype == "count":
        found = scene.find(shape=args["shape"])
        if len(found) >= len(COUNTS):
            raise NotAnswerable(f"{len(found)} {args['shape']}s: counts go up to {len(COUNTS) - 1}")
        return COUNTS[len(found)], tuple(found)

    def one(colour: Optional[str], shape: Optional[str]) -> int:
        found = scene.find(colour, shape)
        if len(found) != 1:
            what = " ".join(w for w in (colour, shape or "object") if w)
            raise NotAnswerable(f"the scene has {len(found)} {what}{'s' if len(found) != 1 else ''}, so 'the {what}' "
                                f"does not pick out one object")
        return found[0]

    if qtype == "query_colour":
        i = one(None, args["shape"])
        return scene.objects[i].colour, (i,)
    if qtype == "query_shape":
        i = one(args["colour"], None)
        return scene.objects[i].shape, (i,)
    if qtype == "relate":
        a, b = one(*args["a"]), one(*args["b"])
        if a == b:
            raise NotAnswerable("both descriptions pick out the same object")
        xa, xb = scene.objects[a].x, scene.objects[b].x
        if abs(xa - xb) < MIN_GAP:
            raise NotAnswerable(f"the two objects are less than {MIN_GAP:g} pixels apart horizontally")
        left = xa < xb
        return ("yes" if left == (args["direction"] == "left") else "no"), (a, b)
    raise ValueError(f"unknown question type {qtype!r}; types: {', '.join(QUESTION_TYPES)}")


def question(scene: Scene, qtype: str, args: dict, text: Optional[str] = None) -> Question:
    """The :class:`Question` record of a question (type and arguments) about ``scene``."""
    text = render(qtype, args) if text is None else text
    answer, referred = ground_truth(scene, qtype, args)
    mask = scene.mask(referred)
    mask.setflags(write=False)
    return Question(text, tuple(tokenize(text)), tuple(encode_question(text)), qtype, answer, referred, mask, scene)


_PATTERNS = {
    "exist": re.compile(r"is there a (\w+) (\w+)"),
    "query_colour": re.compile(r"what colour is the (\w+)"),
    "query_shape": re.compile(r"what shape is the (\w+) object"),
    "count": re.compile(r"how many (\w+)s are there"),
    "relate": re.compile(r"is the (?:(\w+) )?(\w+) (left|right) of the (?:(\w+) )?(\w+)"),
}


def parse(text: str) -> tuple[str, dict]:
    """The type and arguments of a question that follows a template (words as :func:`tokenize` reads them);
    raises :class:`NotAnswerable` otherwise."""
    encode_question(text)  # unknown words and empty questions first
    words = " ".join(tokenize(text))
    for qtype, pattern in _PATTERNS.items():
        m = pattern.fullmatch(words)
        if not m:
            continue
        g = m.groups()
        if qtype == "exist" and g[0] in COLOURS and g[1] in SHAPES:
            return qtype, {"colour": g[0], "shape": g[1]}
        if qtype == "query_colour" and g[0] in SHAPES:
            return qtype, {"shape": g[0]}
        if qtype == "query_shape" and g[0] in COLOURS:
            return qtype, {"colour": g[0]}
        if qtype == "count" and g[0] in SHAPES:
            return qtype, {"shape": g[0]}
        if qtype == "relate" and g[0] in COLOURS + (None,) and g[1] in SHAPES and g[3] in COLOURS + (None,) \
                and g[4] in SHAPES:
            return qtype, {"a": (g[0], g[1]), "direction": g[2], "b": (g[3], g[4])}
    raise NotAnswerable(f"{text!r} follows none of the templates: "
                        f"{'; '.join(repr(example_question(t)) for t in QUESTION_TYPES)}")


def ask(scene: Scene, text: str) -> Question:
    """A question written by a person about ``scene``, with its answer and mask, when it follows a template and
    its descriptions pick out what they must (else :class:`NotAnswerable`, or :class:`UnknownWordError` /
    :class:`EmptyQuestionError` for the words)."""
    qtype, args = parse(text)
    return question(scene, qtype, args, text=text)


def _describe(scene: Scene, i: int) -> Optional[tuple[Optional[str], str]]:
    """The shortest description that picks out object ``i``: its shape, else its colour and shape."""
    o = scene.objects[i]
    if len(scene.find(shape=o.shape)) == 1:
        return None, o.shape
    if len(scene.find(o.colour, o.shape)) == 1:
        return o.colour, o.shape
    return None


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(0, len(items)))]


def _draw_args(scene: Scene, qtype: str, rng: np.random.Generator) -> Optional[dict]:
    """Arguments for a question of ``qtype`` about ``scene`` (``None`` when the scene allows none)."""
    objects = scene.objects
    if qtype == "exist":
        if rng.random() < 0.5:  # yes: an object's colour and shape
            o = _pick(rng, objects)
            return {"colour": o.colour, "shape": o.shape}
        absent = [(c, s) for c in COLOURS for s in SHAPES if not scene.find(c, s)]
        near = [(c, s) for c, s in absent if scene.find(colour=c) or scene.find(shape=s)]  # half right
        c, s = _pick(rng, near if near and rng.random() < 0.75 else absent)
        return {"colour": c, "shape": s}
    if qtype == "query_colour":
        unique = [s for s in SHAPES if len(scene.find(shape=s)) == 1]
        return {"shape": _pick(rng, unique)} if unique else None
    if qtype == "query_shape":
        unique = [c for c in COLOURS if len(scene.find(colour=c)) == 1]
        return {"colour": _pick(rng, unique)} if unique else None
    if qtype == "count":
        shape = _pick(rng, objects).shape if rng.random() < 0.7 else _pick(rng, SHAPES)
        return {"shape": shape}
    if qtype == "relate":
        named = [(i, d) for i in range(len(objects)) if (d := _describe(scene, i)) is not None]
        pairs = [(a, b) for a in named for b in named
                 if a[0] != b[0] and abs(objects[a[0]].x - objects[b[0]].x) >= MIN_GAP]
        if not pairs:
            return None
        (_, da), (_, db) = _pick(rng, pairs)
        return {"a": da, "direction": ("left", "right")[int(rng.integers(0, 2))], "b": db}
    raise ValueError(f"unknown question type {qtype!r}; types: {', '.join(QUESTION_TYPES)}")


def sample(seed: int, qtype: Optional[str] = None) -> Question:
    """The scene and question of ``seed`` (type ``QUESTION_TYPES[seed % 5]`` unless ``qtype`` is given): scenes
    are drawn from the seed's generator until one allows a question of that type."""
    qtype = QUESTION_TYPES[seed % len(QUESTION_TYPES)] if qtype is None else qtype
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; types: {', '.join(QUESTION_TYPES)}")
    rng = np.random.default_rng([seed, 0])
    while True:
        scene = _scene(rng, seed)
        args = _draw_args(scene, qtype, rng)
        if args is not None:
            return question(scene, qtype, args)


def questions_about(scene: Scene, stream: int = 2) -> list[Question]:
    """One question per template that ``scene`` allows, drawn as :func:`sample` draws them, from the generator
    ``[scene.seed, stream]``: the same questions every time (the web demo's suggestions)."""
    rng = np.random.default_rng([scene.seed, stream])
    found = []
    for qtype in QUESTION_TYPES:
        args = _draw_args(scene, qtype, rng)
        if args is None:
            continue
        try:
            found.append(question(scene, qtype, args))
        except NotAnswerable:
            continue
    return found


def questions(start: int, n: int) -> list[Question]:
    """The questions of seeds ``start`` to ``start + n - 1``."""
    return [sample(seed) for seed in range(start, start + n)]


def train_set(n: int, start: int = 0) -> list[Question]:
    """Training questions: seeds ``start`` to ``start + n - 1`` (all below :data:`TEST_SEED`)."""
    if start < 0 or start + n > TEST_SEED:
        raise ValueError(f"training seeds lie in [0, {TEST_SEED}); got [{start}, {start + n})")
    return questions(start, n)


def test_set(n: int = TEST_SIZE) -> list[Question]:
    """The held-out test set: the questions of seeds ``TEST_SEED`` to ``TEST_SEED + n - 1`` (1,000 by default),
    regenerated byte for byte."""
    return questions(TEST_SEED, n)


def digest(items: Iterable[Question]) -> str:
    """SHA-256 over the questions' images, texts, answers, types, referred objects and masks."""
    h = hashlib.sha256()
    for q in items:
        h.update(q.image.tobytes())
        h.update(np.packbits(q.mask).tobytes())
        h.update(f"{q.type}\0{q.text}\0{q.answer}\0{q.referred}\0{q.scene.seed}\n".encode())
    return h.hexdigest()

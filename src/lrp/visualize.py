"""Heatmaps: relevance as pictures (Pillow and NumPy; no plotting library needed).

Colour maps are symmetric around zero: with ``bwr`` positive relevance is red, negative blue and zero white.
"""

from __future__ import annotations

import html as _html
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ArrayLike = Union[np.ndarray, torch.Tensor]

# anchor colours from the most negative (-1) to the most positive (+1) value, evenly spaced
COLORMAPS: dict[str, list[tuple[int, int, int]]] = {
    "bwr": [(0, 0, 255), (255, 255, 255), (255, 0, 0)],
    "seismic": [(0, 0, 77), (0, 0, 255), (255, 255, 255), (255, 0, 0), (128, 0, 0)],
    "coldnhot": [(0, 255, 255), (0, 0, 255), (0, 0, 0), (255, 0, 0), (255, 255, 0)],
    "gray": [(0, 0, 0), (128, 128, 128), (255, 255, 255)],
    "wred": [(255, 255, 255), (255, 255, 255), (255, 0, 0)],  # only positive relevance, on white
}


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(f"got {len(values)} tensors: the relevance of a model with several inputs is a tuple, one "
                        f"tensor per input; draw each on its own, e.g. lrp.heatmap(res.relevance[0][0])")
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def relevance_map(relevance: ArrayLike, channels: str = "sum") -> np.ndarray:
    """Reduce relevance to a 2D map: a single sample ``(C, H, W)``/``(1, C, H, W)`` is summed over channels
    (``channels="sum"``) or kept per colour channel (``channels="rgb"``, returns ``(H, W, C)``)."""
    r = _to_numpy(relevance)
    while r.ndim > 3 and r.shape[0] == 1:
        r = r[0]
    if r.ndim == 2:
        return r
    if r.ndim != 3:
        raise ValueError(f"relevance of shape {r.shape} is not an image; expected (H, W), (C, H, W) or (1, C, H, W)")
    if channels == "sum":
        return r.sum(0)
    if channels == "rgb":
        return np.moveaxis(r, 0, -1)
    raise ValueError(f"channels must be 'sum' or 'rgb', got {channels!r}")


def _scale(r: np.ndarray, vmax: Optional[float], percentile: float) -> np.ndarray:
    if not np.isfinite(r).all():  # one NaN or inf would make the scale, and so the whole map, blank
        raise ValueError(f"the relevance holds {int((~np.isfinite(r)).sum())} values that are not finite (NaN or "
                         f"infinity), which a heatmap cannot show: the model overflowed on this input")
    if vmax is None:
        magnitude = np.abs(r)
        vmax = float(np.percentile(magnitude, percentile)) if percentile < 100 else float(magnitude.max())
    if vmax <= 0 or not np.isfinite(vmax):
        return np.zeros_like(r)
    return np.clip(r / vmax, -1.0, 1.0)


def colorize(values: np.ndarray, cmap: str = "bwr") -> np.ndarray:
    """Map values in [-1, 1] to RGB uint8 with a named colour map."""
    if cmap not in COLORMAPS:
        raise ValueError(f"unknown colour map {cmap!r}; choose one of {', '.join(COLORMAPS)}")
    anchors = np.asarray(COLORMAPS[cmap], dtype=np.float64)
    positions = np.linspace(-1.0, 1.0, len(anchors))
    rgb = np.stack([np.interp(values, positions, anchors[:, k]) for k in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def heatmap(relevance: ArrayLike, cmap: str = "bwr", *, vmax: Optional[float] = None, percentile: float = 100.0,
            channels: str = "sum", size: Optional[tuple[int, int]] = None) -> Image.Image:
    """Relevance as an RGB image, scaled symmetrically so that ``+-vmax`` (default: the largest magnitude, or
    its ``percentile``) saturate the colour map. ``channels="rgb"`` shows each colour channel's relevance as
    that channel's intensity (positive only, on black). ``size`` resizes (width, height) with nearest pixels."""
    r = relevance_map(relevance, channels)
    if channels == "rgb":
        scaled = _scale(r, vmax, percentile)
        image = Image.fromarray(np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8))
    else:
        image = Image.fromarray(colorize(_scale(r, vmax, percentile), cmap))
    return image.resize(size, Image.Resampling.NEAREST) if size else image


def _image_array(image: Union[Image.Image, ArrayLike]) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    a = _to_numpy(image)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _stretch(gray: np.ndarray, low: float, high: float) -> np.ndarray:
    """Contrast-stretch to [0, 1] between the ``low`` and ``high`` percentiles (robust to a few outliers); falls
    back to the full range when the percentiles coincide (e.g. a mostly black scan), and leaves a constant image
    as it is."""
    lo, hi = (float(v) for v in np.percentile(gray, [low, high]))
    if hi <= lo:
        lo, hi = float(gray.min()), float(gray.max())
    if hi <= lo:
        return gray
    return np.clip((gray - lo) / (hi - lo), 0.0, 1.0)


def overlay(image: Union[Image.Image, ArrayLike], relevance: ArrayLike, cmap: str = "bwr", *,
            alpha: float = 0.75, vmax: Optional[float] = None, percentile: float = 100.0, gamma: float = 0.5,
            stretch: Optional[tuple[float, float]] = (1.0, 99.0),
            base_range: Optional[tuple[float, float]] = (0.3, 0.9)) -> Image.Image:
    """The heatmap blended over a grayscale version of ``image``, readable on dark (e.g. MRI) and light images.

    The grayscale base is contrast-stretched between the ``stretch`` percentiles and then lifted into
    ``base_range`` (a light range, so that red and blue show over black parts too); where relevance is zero the
    result is this lightened image. Relevance is scaled to [-1, 1] as in :func:`heatmap` (``vmax``,
    ``percentile``) and shown on the compressed scale ``t = sign(r) * |r| ** gamma``: the colour is ``cmap(t)``
    and its weight ``alpha * |t|``, so that moderate relevance stays visible (``gamma < 1``).
    ``alpha=0.6, gamma=1, stretch=None, base_range=None`` gives the plain blend of earlier versions."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    base = _image_array(image).mean(-1)
    r = _scale(relevance_map(relevance), vmax, percentile)
    if r.shape != base.shape:
        raise ValueError(f"relevance map {r.shape} and image {base.shape} differ in size")
    if stretch is not None:
        base = _stretch(base, *stretch)
    if base_range is not None:
        low, high = base_range
        base = low + (high - low) * base
    t = np.sign(r) * np.abs(r) ** gamma
    colour = colorize(t, cmap).astype(np.float64) / 255.0
    weight = alpha * np.abs(t)[..., None]
    blended = (1 - weight) * base[..., None] + weight * colour
    return Image.fromarray(np.round(np.clip(blended, 0.0, 1.0) * 255).astype(np.uint8))


# --------------------------------------------------------------------------- tokens

# how tokenizers mark pieces: byte-level BPE (GPT-2, RoBERTa, Llama 3, Qwen: "Ġ" a space, "Ċ" a newline, bytes as
# characters), SentencePiece (Llama 2, T5, XLM-R: "▁" a space, "<0x0A>" a byte), WordPiece (BERT: "##" a piece
# that continues the word before it), or plain (whole words, shown with spaces between them)
TOKEN_STYLES = ("auto", "plain", "byte", "sentencepiece", "wordpiece")
_SPACE_SYMBOLS = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d", "\u3000": "\u2423"}


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-to-character table, reversed: the character byte-level BPE writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_table()
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_style(tokens: Sequence[str], special: Optional[Sequence[bool]] = None) -> str:
    """How ``tokens`` mark their pieces (see ``TOKEN_STYLES``), judged from the pieces themselves: "▁" ->
    ``"sentencepiece"``, "Ġ" or "Ċ" -> ``"byte"``, a piece starting with "##" -> ``"wordpiece"``, else ``"plain"``."""
    pieces = [t for k, t in enumerate(tokens) if not (special is not None and special[k])]
    if any("\u2581" in t for t in pieces):
        return "sentencepiece"
    if any("\u0120" in t or "\u010a" in t for t in pieces):
        return "byte"
    if any(t.startswith("##") and len(t) > 2 for t in pieces):
        return "wordpiece"
    return "plain"


def _piece_bytes(token: str, style: str) -> bytes:
    """The text a piece stands for, as UTF-8 bytes (a byte-level piece may hold part of a character)."""
    if style == "byte":
        return b"".join(bytes([_BYTE_LEVEL[c]]) if c in _BYTE_LEVEL else c.encode("utf-8") for c in token)
    if style == "sentencepiece":
        match = _SP_BYTE.fullmatch(token)
        return bytes([int(match.group(1), 16)]) if match else token.replace("\u2581", " ").encode("utf-8")
    if style == "wordpiece" and token.startswith("##") and len(token) > 2:
        return token[2:].encode("utf-8")
    return token.encode("utf-8")


def _special_mask(tokens: Sequence[str], special: Union[Sequence[bool], Iterable[str], None]) -> list[bool]:
    if special is None:
        return [False] * len(tokens)
    if isinstance(special, (str, bytes)):
        raise TypeError("special must be one flag per token or a collection of special token strings, not one string")
    given = list(special)
    if given and all(isinstance(s, (bool, np.bool_)) for s in given):
        if len(given) != len(tokens):
            raise ValueError(f"{len(given)} special flags for {len(tokens)} tokens; give one flag per token")
        return [bool(s) for s in given]
    names = {str(s) for s in given}
    return [t in names for t in tokens]


def token_words(tokens: Sequence[str], style: str = "auto",
                special: Union[Sequence[bool], Iterable[str], None] = None) -> list[Optional[int]]:
    """The word each token belongs to (0, 1, ...; ``None`` for special tokens and pieces that are only
    whitespace), read from the pieces' marks: a byte-level or SentencePiece piece that starts with a space starts
    a word, a WordPiece piece without "##" starts one, and plain tokens are a word each. Words are what lies
    between spaces, so punctuation joins the word it is written against."""
    mask = _special_mask(tokens, special)
    style = token_style(tokens, mask) if style == "auto" else _check_style(style)
    words: list[Optional[int]] = []
    word = -1
    joinable = False  # whether the token before can take a continuation piece
    for token, is_special in zip(tokens, mask):
        if is_special:
            words.append(None)
            joinable = False
            continue
        text = _piece_bytes(token, style).decode("utf-8", errors="replace")
        if text and not text.strip():
            words.append(None)
            joinable = False
            continue
        if style in ("byte", "sentencepiece"):
            starts = not joinable or text[:1].isspace()
        elif style == "wordpiece":
            starts = not joinable or not (token.startswith("##") and len(token) > 2)
        else:
            starts = True
        if starts:
            word += 1
        words.append(word)
        joinable = not text[-1:].isspace() if text else joinable
    return words


def _check_style(style: str) -> str:
    if style not in TOKEN_STYLES:
        raise ValueError(f"unknown token style {style!r}; choose one of {', '.join(TOKEN_STYLES)}")
    return style


@dataclass
class _Unit:
    """What one span shows: a token, or the pieces of a word merged."""

    pieces: list[str]
    text: str
    value: float
    special: bool
    word: Optional[int]


def _token_units(tokens: Sequence[str], relevance: ArrayLike, *, merge: bool, style: str,
                 special: Union[Sequence[bool], Iterable[str], None],
                 words: Optional[Sequence[Optional[int]]]) -> tuple[list[_Unit], str]:
    r = _to_numpy(relevance).reshape(-1)
    tokens = [str(t) for t in tokens]
    if len(tokens) != len(r):
        raise ValueError(f"{len(tokens)} tokens but {len(r)} relevance values; give one value per token")
    mask = _special_mask(tokens, special)
    style = token_style(tokens, mask) if style == "auto" else _check_style(style)
    if words is None:
        words = token_words(tokens, style, mask) if style != "plain" else list(range(len(tokens)))
    elif len(words) != len(tokens):
        raise ValueError(f"{len(words)} word indices for {len(tokens)} tokens; give one per token (None: no word)")
    units: list[_Unit] = []
    raw: list[bytes] = []  # the bytes of each unit, decoded once the unit is complete
    for k, token in enumerate(tokens):
        word = None if mask[k] else words[k]
        data = token.encode("utf-8") if mask[k] else _piece_bytes(token, style)
        last = units[-1] if units else None
        if merge and last is not None and word is not None and last.word == word and not last.special:
            last.pieces.append(token)
            last.value += float(r[k])
            raw[-1] += data
            continue
        units.append(_Unit([token], "", float(r[k]), mask[k], word))
        raw.append(data)
    for unit, data in zip(units, raw):
        unit.text = data.decode("utf-8", errors="replace")
    return units, style


def _shown(text: str) -> str:
    """Whitespace made visible (a token that is only a space or a newline still needs something to colour)."""
    return "".join(_SPACE_SYMBOLS.get(c, c) if c.isspace() else c for c in text) or "\u2205"


def token_html(tokens: Sequence[str], relevance: ArrayLike, cmap: str = "bwr", *, vmax: Optional[float] = None,
               merge: bool = False, style: str = "auto", special: Union[Sequence[bool], Iterable[str], None] = None,
               words: Optional[Sequence[Optional[int]]] = None) -> str:
    """Tokens as HTML spans coloured by their relevance (red for, blue against), with the value on hover.

    Subword pieces are shown as the text they stand for: byte-level BPE's "Ġ" and SentencePiece's "▁" become
    spaces, "Ċ" and "<0x0A>" newlines, WordPiece's "##" joins the piece to the word before it (``style``:
    ``"auto"``, judged from the pieces, or one of ``"plain"``, ``"byte"``, ``"sentencepiece"``, ``"wordpiece"``;
    plain tokens are shown as words with spaces between them). A token that is only whitespace shows as
    "␣"/"↵". ``merge=True`` shows one span per word, with the relevance of its pieces summed (hover: the
    pieces). ``words`` gives each token's word index (``None``: part of no word), e.g. from a tokenizer's
    offsets; by default words are read from the pieces' marks (:func:`token_words`). ``special`` marks special
    tokens (``<s>``, ``[CLS]``; one flag per token, or the special token strings, e.g.
    ``tokenizer.all_special_tokens``): shown as they are, framed, never merged. Colours are scaled to ``vmax``
    (default: the largest magnitude among the spans shown). Token text is HTML-escaped."""
    units, style = _token_units(tokens, relevance, merge=merge, style=style, special=special, words=words)
    values = np.array([u.value for u in units], dtype=np.float64)
    colours = colorize(_scale(values, vmax, 100.0), cmap).tolist() if len(units) else []
    spaced = style in ("plain", "wordpiece")  # pieces carry no spaces: put one between words
    parts: list[str] = []
    for k, (unit, c) in enumerate(zip(units, colours)):
        text = unit.pieces[0] if unit.special else unit.text
        lead = ""
        if not unit.special and text.strip():
            body = text.lstrip()
            lead, text = text[:len(text) - len(body)], body
        if spaced and k > 0 and not lead and (unit.word is None or unit.word != units[k - 1].word):
            lead = " "
        if k == 0:
            lead = lead.lstrip(" ")
        after = "\n" * text.count("\n") if not unit.special and not text.strip() else ""
        shown = text if unit.special else _shown(text) if not text.strip() else text
        dark = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 110
        title = f"{' '.join(p if p.strip() else _shown(p) for p in unit.pieces)}: {unit.value:+.4g}"
        style_attr = (f"background-color: rgb({c[0]}, {c[1]}, {c[2]}); padding: 0 2px; border-radius: 3px"
                      + ("; color: white" if dark else "")
                      + ("; outline: 1px dashed #999; margin: 0 2px; font-size: 0.85em" if unit.special else ""))
        parts.append(f'{_html.escape(lead)}<span class="{"lrp-special" if unit.special else "lrp-token"}" '
                     f'data-relevance="{unit.value:.9g}" title="{_html.escape(title)}" style="{style_attr}">'
                     f'{_html.escape(shown)}</span>{after}')
    return ('<div class="lrp-tokens" style="line-height: 1.8; font-family: sans-serif; white-space: pre-wrap">'
            + "".join(parts) + "</div>")


def is_multiband(shape: Union[Sequence[int], ArrayLike], *, max_channels: int = 3) -> bool:
    """Whether one sample's relevance of this shape (or this array's shape) is best shown band by band with
    :func:`channel_grid` rather than as one heatmap: ``(C, H, W)`` with more than ``max_channels`` channels
    (e.g. 30 spectral bands; 1-3 channels are grayscale/RGB and get one summed map), or a cube
    ``(C, D, H, W)`` with more than one band ``D`` (a Conv3d input). A leading batch axis of 1 on a 5D shape is
    ignored; a 4D shape is taken as ``(C, D, H, W)``, not as a batch."""
    shape = tuple(int(n) for n in getattr(shape, "shape", shape))
    while len(shape) > 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 3:
        return shape[0] > max_channels
    if len(shape) == 4:
        return shape[1] > 1
    return False


def _font(size: int) -> Union[ImageFont.ImageFont, ImageFont.FreeTypeFont]:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom)


def channel_grid(relevance: ArrayLike, cmap: str = "bwr", *, columns: Optional[int] = None, scale: int = 4,
                 vmax: Optional[float] = None, percentile: float = 100.0, gap: int = 2, axis: int = -3,
                 labels: Union[bool, Sequence[str]] = True, colorbar: bool = True,
                 font_size: int = 11) -> Image.Image:
    """One heatmap per band, laid out in a grid, on one shared symmetric colour scale so that bands compare.

    ``relevance`` is one sample: ``(C, H, W)`` (one tile per channel, e.g. 30 spectral bands), a cube
    ``(C, D, H, W)`` of a Conv3d model (summed over ``C``, one tile per band ``D``), or either with a leading
    batch axis of 1 on a 5D array. ``axis`` says which axis holds the bands (default ``-3``, the one before
    ``H, W``: ``C`` of a ``(C, H, W)``, ``D`` of a ``(C, D, H, W)``); all other axes but ``H, W`` are summed.
    Each map is enlarged ``scale`` times; ``columns`` defaults to about the square root of the band count.

    ``labels``: ``True`` draws "band k" (or just "k" where that does not fit) above each tile in PIL's default
    font; a sequence of strings (e.g. wavelengths) gives one label per band; ``False`` draws none.
    ``colorbar`` adds a colour bar under the grid with the shared scale's values ``-vmax, 0, +vmax`` (``vmax``
    defaults to the largest magnitude over all bands, or its ``percentile``). The returned image's ``info``
    holds ``"tiles"``, each tile's box ``(left, top, right, bottom)`` in band order, and ``"vmax"``."""
    r = _to_numpy(relevance)
    given = r.shape
    if r.ndim < 3:
        raise ValueError(f"channel_grid needs one sample's relevance shaped (C, H, W) or (C, D, H, W); "
                         f"got {given}")
    if not -r.ndim <= axis < r.ndim or axis % r.ndim >= r.ndim - 2:
        raise ValueError(f"axis {axis} does not hold bands in relevance of shape {given}; use an axis before "
                         f"the last two (H, W)")
    axis = axis % r.ndim  # counted in the array as given, before a batch axis of 1 is dropped
    while r.ndim > 4 and r.shape[0] == 1:
        r, axis = r[0], axis - 1
    if r.ndim not in (3, 4):
        raise ValueError(f"channel_grid needs one sample's relevance shaped (C, H, W) or (C, D, H, W); "
                         f"got {given}")
    if axis < 0:
        raise ValueError(f"axis {axis + len(given) - r.ndim} of relevance shaped {given} is its batch axis; "
                         f"give the axis that holds the bands")
    r = np.moveaxis(r, axis, 0)
    if r.ndim == 4:
        r = r.sum(1)
    bands, h, w = r.shape
    if isinstance(labels, bool):
        texts = [f"band {k}" for k in range(bands)] if labels else None
    else:
        texts = [str(t) for t in labels]
        if len(texts) != bands:
            raise ValueError(f"{len(texts)} labels for {bands} bands; give one label per band")
    if vmax is None:
        magnitude = np.abs(r)
        vmax = float(np.percentile(magnitude, percentile)) if percentile < 100 else float(magnitude.max())
    scaled = _scale(r, vmax, 100.0)  # shared scale across bands

    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tile_w, tile_h = w * scale, h * scale
    label_w = label_h = 0
    if texts is not None:
        if labels is True and max(_text_size(measure, t, font)[0] for t in texts) > tile_w - 2:
            texts = [str(k) for k in range(bands)]  # small tiles: the bare band numbers
        label_w = max(_text_size(measure, t, font)[0] for t in texts)
        label_h = max(_text_size(measure, t, font)[1] for t in texts + ["band 0"]) + 3
    pad = 1  # room for the frame around the tiles on the image's edges
    columns = max(1, min(columns or int(np.ceil(np.sqrt(bands))), bands))
    rows = int(np.ceil(bands / columns))
    cell_w, cell_h = max(tile_w, label_w + 4 if texts is not None else 0), label_h + tile_h
    grid_w = 2 * pad + columns * cell_w + (columns - 1) * gap
    grid_h = 2 * pad + rows * cell_h + (rows - 1) * gap

    bar_h = bar_w = 0
    if colorbar:
        ticks = [f"{-vmax:.3g}", "0", f"+{vmax:.3g}"]
        tick_w = [_text_size(measure, t, font)[0] for t in ticks]
        text_h = max(_text_size(measure, t, font)[1] for t in ticks)
        bar_w = max(min(grid_w - 2 * pad, 240), sum(tick_w) + 24)
        bar_h = 6 + 10 + 2 + text_h + 3
    width = max(grid_w, bar_w + 2 * pad)
    grid = Image.new("RGB", (width, grid_h + bar_h), "white")
    draw = ImageDraw.Draw(grid)
    boxes = []
    for k in range(bands):
        x, y = pad + (k % columns) * (cell_w + gap), pad + (k // columns) * (cell_h + gap)
        if texts is not None:
            tw = _text_size(measure, texts[k], font)[0]
            draw.text((x + (cell_w - tw) // 2, y), texts[k], fill=(30, 30, 30), font=font)
        left, top = x + (cell_w - tile_w) // 2, y + label_h
        boxes.append((left, top, left + tile_w, top + tile_h))
    for left, top, right, bottom in boxes:  # a light frame, so that white (irrelevant) tiles show their extent
        draw.rectangle((left - 1, top - 1, right, bottom), outline=(200, 200, 200))
    for k, (left, top, _, _) in enumerate(boxes):
        tile = Image.fromarray(colorize(scaled[k], cmap)).resize((tile_w, tile_h), Image.Resampling.NEAREST)
        grid.paste(tile, (left, top))
    if colorbar:
        x0, y0 = (width - bar_w) // 2, grid_h + 6
        ramp = colorize(np.linspace(-1.0, 1.0, bar_w), cmap)
        grid.paste(Image.fromarray(np.repeat(ramp[None], 10, 0)), (x0, y0))
        draw.rectangle((x0 - 1, y0 - 1, x0 + bar_w, y0 + 10), outline=(120, 120, 120))
        ty = y0 + 12
        draw.text((x0, ty), ticks[0], fill=(30, 30, 30), font=font)
        draw.text((x0 + (bar_w - tick_w[1]) // 2, ty), ticks[1], fill=(30, 30, 30), font=font)
        draw.text((x0 + bar_w - tick_w[2], ty), ticks[2], fill=(30, 30, 30), font=font)
    grid.info["tiles"] = boxes
    grid.info["vmax"] = vmax
    return grid

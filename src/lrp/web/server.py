"""Running the app: ``lrp serve`` loads the models, warms them up and starts uvicorn."""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional, Sequence

import torch

from ..errors import ModelError
from ..pipeline.text import is_text_spec
from .service import ServedModel
from .text_service import DEFAULT_MODELS, ServedText
from .vqa_service import Served, ServedVQA, is_vqa_spec

PREPROCESSING = ("size", "crop", "mean", "std", "pixels", "grayscale", "invert")
# models with fewer parameters run on one torch thread by default: they are no faster on more, and threads that
# wait for each other make them many times slower when other processes keep the cores busy (seen: 1.5 ms on one
# thread, 144 ms on two, for the MNIST model while another job used both cores)
SMALL_MODEL = 5_000_000


def load_models(groups: Sequence[dict[str, Any]], device: str = "cpu") -> list[Served]:
    """One model per group of ``lrp serve`` options (``model``, ``weights``, ``classes`` and the preprocessing
    options), each on ``device``: a :class:`ServedVQA` for ``vqa`` (small: on the CPU whatever ``device`` says), a
    :class:`ServedText` for ``spam`` and ``hf:DIR``, else a :class:`ServedModel`. No groups: ``mnist``, ``spam``
    and ``vqa``. Raises ``ModelError``."""
    models: list[Served] = []
    for g in groups or [{"model": spec} for spec in DEFAULT_MODELS]:
        spec = g.get("model", "mnist")
        if is_vqa_spec(spec):
            given = [k for k in ("weights", "classes", *PREPROCESSING) if k in g]
            if given:
                raise ModelError(f"--{given[0]} does not apply to the VQA model {spec}: it reads its own 64x64 scenes "
                                 f"and answers; give --model {spec} without options")
            models.append(ServedVQA.load(spec))
        elif is_text_spec(spec):
            given = [k for k in ("weights", *PREPROCESSING) if k in g]
            if given:
                raise ModelError(f"--{given[0]} applies to image models; the text model {spec} takes only --classes "
                                 f"(hf:DIR classifiers)")
            models.append(ServedText.load(spec, g.get("classes"), device=device))
        else:
            models.append(ServedModel.load(spec, g.get("weights"), g.get("classes"), device=device,
                                           **{k: g[k] for k in PREPROCESSING if k in g}))
    return models


def serve(groups: Sequence[dict[str, Any]], host: str = "127.0.0.1", port: int = 8000,
          threads: Optional[int] = None, log_level: str = "info", device: str = "cpu") -> None:
    """Load and warm up the models, then serve until interrupted."""
    import uvicorn

    from .app import create_app

    models = load_models(groups, device)
    if threads is None and all(sum(p.numel() for p in m.model.parameters()) < SMALL_MODEL for m in models):
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    app = create_app(models)
    names = ", ".join(app.state.models)
    shown = f"[{host}]" if ":" in host else host
    print(f"lrp serve: http://{shown}:{port}/ (models: {names} on {device}; API docs at /docs; "
          f"torch threads: {torch.get_num_threads()})", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lrp serve: listening on {host}: reachable from other machines", file=sys.stderr, flush=True)
    logging.getLogger("lrp.web").setLevel(log_level.upper())
    uvicorn.run(app, host=host, port=port, log_level=log_level)

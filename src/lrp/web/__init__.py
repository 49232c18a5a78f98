"""``lrp serve``: a small web app to explain models in the browser ("draw a digit, see why") and a JSON API.

Needs the ``web`` extra (``pip install 'lrp[web]'``: FastAPI, uvicorn, python-multipart). This package imports
none of them itself, so that :func:`missing_dependencies` can say what is missing; import
:func:`lrp.web.app.create_app` to build the app.
"""

from __future__ import annotations

from importlib.util import find_spec

# import name -> name on PyPI
REQUIREMENTS = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}
# uvicorn's WebSockets (the Camera tab) need one of these; the web extra installs the first
WEBSOCKETS = {"wsproto": "wsproto", "websockets": "websockets"}


def missing_dependencies() -> list[str]:
    """The PyPI names of the web extra's packages that are not installed."""
    missing = [package for module, package in REQUIREMENTS.items() if find_spec(module) is None]
    if all(find_spec(module) is None for module in WEBSOCKETS):
        missing.append(next(iter(WEBSOCKETS.values())))
    return missing

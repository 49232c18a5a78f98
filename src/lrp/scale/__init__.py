"""Explain a whole dataset into one Zarr store: ``lrp explain DIR --store zarr`` (see ``docs/scale.md``).

- :mod:`~lrp.scale.sources`: the inputs (images, arrays, path lists, WebDataset shards), one row each, and the
  ``Dataset`` that decodes them in DataLoader workers;
- :mod:`~lrp.scale.store`: the store's layout, its manifest, atomic chunk commits and done markers, the index;
- :mod:`~lrp.scale.distributed`: ranks from torchrun's environment and how chunks are shared among them;
- :mod:`~lrp.scale.run`: the run itself (:func:`explain_to_store`).
"""

from .distributed import rank_device
from .run import StoreError, StoreOptions, explain_to_store
from .store import ARRAY, GROUP

__all__ = ["explain_to_store", "StoreOptions", "StoreError", "rank_device", "ARRAY", "GROUP"]

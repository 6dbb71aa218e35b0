"""Medical image data for autocnnp (the ImgMed part of the thesis).

* :mod:`autocnnp.data.synthetic` -- writes small, seeded Decathlon-style datasets (no downloads).
* :mod:`autocnnp.data.decathlon` -- reads ``dataset.json`` / CSV indexes, loads NIfTI cases and
  validates a dataset case by case.
* :mod:`autocnnp.data.preprocess` -- slice extraction, modality selection, resizing, z-score
  normalisation and the on-disk training cache (:func:`build_cache`, :class:`CacheDataset`).
* :mod:`autocnnp.data.augment` -- seeded 2D affine augmentation (thesis Table 2.1).
* :mod:`autocnnp.data.datasets` -- an in-memory synthetic 2D dataset for demos and unit tests.
* :mod:`autocnnp.data.errors` -- :class:`DataError`, the one error type for bad data.

Only ``preprocess``, ``augment`` and ``datasets`` import torch.
"""

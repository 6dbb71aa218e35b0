"""Medical image data (the ImgMed part of the thesis); the data formats that use it are components
(autocnnp/components/datasets/).

* :mod:`.index` -- which cases a dataset holds (``dataset.json`` or a CSV index).
* :mod:`.volumes` -- NIfTI cases loaded channels last; label maps written on the source grid.
* :mod:`.checks` -- every file of a dataset checked, streaming the voxels; verdicts stamped.
* :mod:`.preprocess` -- slices, modality selection, resizing, z-score and the on-disk slice cache.
* :mod:`.augment` -- seeded 2D affine augmentation (thesis Table 2.1), per item or per batch on the device.
* :mod:`.batches` -- minibatches read whole, moved to the training device and augmented there.
* :mod:`.synth` -- small, seeded Decathlon-style datasets written as NIfTI (``autocnnp synth``).
* :mod:`.commands` -- ``autocnnp synth``, ``preprocess``, ``check-data``.

Only ``preprocess``, ``augment``, ``batches`` and ``synthetic_slices`` import torch.
"""

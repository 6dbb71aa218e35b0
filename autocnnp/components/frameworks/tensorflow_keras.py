"""Framework: TensorFlow with Keras 3 (the seeds' own stack). Importing this file imports TensorFlow:
the registry reads it without importing it, so only jobs that choose tensorflow do."""

from __future__ import annotations

from autocnnp.generator.protocols import Framework
from autocnnp.generator.registry import component
from autocnnp.training import loop

try:
    from autocnnp.training import keras_trainer
except ModuleNotFoundError as exc:  # TensorFlow is installed by `make tensorflow`, not by `make venv`
    if exc.name != "tensorflow":
        raise
    raise RuntimeError("the job trains with framework tensorflow, which is not installed in this environment: run "
                       "`make tensorflow` (pip install -r requirements/tensorflow.txt)") from None


@component("tensorflow", aliases=("tf",), frameworks=("tensorflow",))
class TensorFlow(Framework):
    """TensorFlow 2 with Keras 3: MultiWorkerMirroredStrategy (ring) or Horovod, Keras models.

    Each rank runs training/keras_trainer.py's run in training/loop.py's epoch loop, on the same data
    pipeline, metrics, LR policies and checkpoints as torch."""

    def build(self, gen, monitoring, *, beat=lambda: None, timeout_s: float):
        return keras_trainer.build(gen, monitoring, beat=beat, timeout_s=timeout_s)

    def fit(self, run, monitoring, *, beat=lambda: None, should_stop=lambda: False, trackers=()):
        return loop.fit(run, monitoring, beat, should_stop, trackers)

    def network(self, gen, weights: dict, *, in_channels: int, num_classes: int):
        """The job's Keras network with ``weights``, as a torch module taking and returning NCHW tensors."""
        return keras_trainer.inference_module(gen, weights, in_channels=in_channels, num_classes=num_classes)

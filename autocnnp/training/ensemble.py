"""Networks behind predict's torch interface that are not one torch checkpoint: an ONNX model run by ONNX
Runtime (``autocnnp export``'s fp32 or int8 file) and an ensemble averaging its members' class probabilities.

Both are torch modules taking ``[N, C, ...]`` float input and returning logits, so every predictor runs them
as it runs a checkpoint's network (slices, sliding windows, test-time flips). The ensemble returns the log of
the members' mean probabilities: the softmax predict takes of it is that mean again.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .sliding_window import probabilities_of


def onnx_session(path: Path, threads: int | None = None):
    """An ONNX Runtime inference session of ``path`` on the CPU (ImportError when ONNX Runtime is missing)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(sess, images):
    """The logits of a float32 batch ``[N, C, ...]`` (numpy) from an ONNX Runtime session."""
    return sess.run(None, {sess.get_inputs()[0].name: images})[0]


class OnnxNetwork(torch.nn.Module):
    """An exported ONNX model (fp32 or int8) as a torch module; runs on the CPU with ONNX Runtime."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.session = onnx_session(self.path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(onnx_logits(self.session, images)).to(x.device)


class Ensemble(torch.nn.Module):
    """Members (torch modules giving logits) whose class probabilities are averaged, with equal weights. With
    ``each``, each member's own log-probabilities follow the ensemble's along the channels (``groups`` sets of
    classes side by side, for a :class:`~autocnnp.training.predictor.Predictor` with as many ``groups``), so one
    pass of every member gives the ensemble and each member alone."""

    def __init__(self, members: list[torch.nn.Module], each: bool = False):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.groups = 1 + len(members) if each else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = [probabilities_of(member(x)) for member in self.members]
        mean = sum(probabilities) / len(probabilities)
        return torch.cat([_log(p) for p in [mean, *probabilities][:self.groups]], dim=1)


def _log(probabilities: torch.Tensor) -> torch.Tensor:
    return torch.log(probabilities.clamp_min(torch.finfo(torch.float32).tiny))

"""Seeded 2D affine data augmentation (thesis Table 2.1, left-atrium dataset).

Table 2.1 lists rotation in [-45, 45] degrees, zoom in [0.8, 1.2] and translation of up to 25.6
pixels along x and along y (5 % of the 512-pixel slices, Keras' ``width_shift_range`` /
``height_shift_range``). :class:`RandomAffine2D` draws one such transform per ``(seed, epoch,
index)`` and applies it identically to the image (bilinear) and to its label map (nearest
neighbour), so augmentation is reproducible on any rank and in any DataLoader worker.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class RandomAffine2D:
    """Random rotation, isotropic zoom and translation of a 2D image ``[C, H, W]`` and its mask ``[H, W]``.

    ``rotation``: the angle is uniform in ``[-rotation, rotation]`` degrees. ``zoom``: the scale
    factor is uniform in ``(low, high)`` (> 1 enlarges the content). ``translate``: the shifts
    along x and y are each uniform in ``[-t, t]``, with ``t = translate`` pixels when
    ``translate >= 1`` and ``t = translate * width`` (resp. height) when ``translate < 1`` (the
    Keras convention). Areas moved in from outside are 0 in the image and background (0) in the
    label. ``image_mode`` is ``"bilinear"`` (default) or ``"nearest"``.

    The transform drawn depends only on ``(seed, epoch, index)``. Inputs may be torch tensors or
    numpy arrays; outputs have the input's type and dtype.
    """

    def __init__(
        self,
        rotation: float = 45.0,
        zoom=(0.8, 1.2),
        translate: float = 25.6,
        seed: int = 0,
        image_mode: str = "bilinear",
    ):
        if rotation < 0 or translate < 0:
            raise ValueError("rotation and translate must be >= 0")
        if isinstance(zoom, (int, float)):
            zoom = (1.0 - float(zoom), 1.0 + float(zoom)) if zoom < 1 else (float(zoom), float(zoom))
        low, high = (float(z) for z in zoom)
        if not 0 < low <= high:
            raise ValueError(f"zoom must be a range 0 < low <= high, got {zoom}")
        if image_mode not in ("bilinear", "nearest"):
            raise ValueError(f"image_mode must be 'bilinear' or 'nearest', got {image_mode!r}")
        self.rotation = float(rotation)
        self.zoom = (low, high)
        self.translate = float(translate)
        self.seed = int(seed)
        self.image_mode = image_mode

    def __repr__(self) -> str:
        return (f"RandomAffine2D(rotation={self.rotation}, zoom={self.zoom}, translate={self.translate}, "
                f"seed={self.seed}, image_mode={self.image_mode!r})")

    def params(self, *, epoch: int, index: int, size) -> tuple[float, float, float, float]:
        """The transform for ``(epoch, index)`` on an image of ``size = (H, W)``:
        ``(angle_degrees, zoom, shift_x_pixels, shift_y_pixels)``."""
        h, w = (int(s) for s in size)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF])
        angle = rng.uniform(-self.rotation, self.rotation)
        zoom = rng.uniform(*self.zoom)
        tx_max = self.translate * w if self.translate < 1 else self.translate
        ty_max = self.translate * h if self.translate < 1 else self.translate
        tx = rng.uniform(-tx_max, tx_max)
        ty = rng.uniform(-ty_max, ty_max)
        return float(angle), float(zoom), float(tx), float(ty)

    @staticmethod
    def theta(angle: float, zoom: float, tx: float, ty: float, size) -> torch.Tensor:
        """The ``[2, 3]`` matrix for ``F.affine_grid`` (``align_corners=False``) of the transform.

        Output pixel ``p`` samples input pixel ``R(-angle) (p - t) / zoom`` about the image
        centre, i.e. the content is rotated by ``angle``, scaled by ``zoom`` and then shifted by
        ``(tx, ty)`` pixels. Works in pixel units, so non-square images are not sheared.
        """
        h, w = (int(s) for s in size)
        a = math.radians(angle)
        c, s = math.cos(a), math.sin(a)
        m = np.array([[c, s], [-s, c]], dtype=np.float64) / zoom  # R(-a) / zoom
        scale = np.array([w / 2.0, h / 2.0])
        lin = m * scale[None, :] / scale[:, None]  # S^-1 M S
        off = -(m @ np.array([tx, ty])) / scale  # -S^-1 M t
        return torch.tensor(np.concatenate([lin, off[:, None]], axis=1), dtype=torch.float32)

    def __call__(self, image, label=None, *, epoch: int, index: int):
        as_numpy = isinstance(image, np.ndarray)
        img = torch.as_tensor(np.asarray(image)) if as_numpy else image
        squeeze = img.dim() == 2
        if squeeze:
            img = img[None]
        if img.dim() != 3:
            raise ValueError(f"expected an image [C, H, W] or [H, W], got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        theta = self.theta(*self.params(epoch=epoch, index=index, size=(h, w)), size=(h, w))
        grid = F.affine_grid(theta[None], [1, img.shape[0], h, w], align_corners=False)
        work = img.to(torch.float32) if not img.is_floating_point() else img
        out = F.grid_sample(work[None], grid.to(work.dtype), mode=self.image_mode, padding_mode="zeros",
                            align_corners=False)[0]
        if not img.is_floating_point():
            out = out.round()
        out = out.to(img.dtype)
        if squeeze:
            out = out[0]
        if as_numpy:
            out = out.numpy()

        if label is None:
            return out, None
        lab_numpy = isinstance(label, np.ndarray)
        lab = torch.as_tensor(np.asarray(label)) if lab_numpy else label
        if tuple(lab.shape[-2:]) != (h, w) or lab.dim() != 2:
            raise ValueError(f"label shape {tuple(lab.shape)} does not match image size {(h, w)}")
        moved = F.grid_sample(lab.to(torch.float32)[None, None], grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[0, 0]
        moved = moved.round().to(lab.dtype)
        return out, (moved.numpy() if lab_numpy else moved)

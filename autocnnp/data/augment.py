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
    """Random rotation, isotropic zoom and translation of a 2D image ``[C, H, W]`` and its mask ``[H, W]``,
    optionally random flips and intensity changes.

    ``rotation``: the angle is uniform in ``[-rotation, rotation]`` degrees. ``zoom``: the scale
    factor is uniform in ``(low, high)`` (> 1 enlarges the content). ``translate``: the shifts
    along x and y are each uniform in ``[-t, t]``, with ``t = translate`` pixels when
    ``translate >= 1`` and ``t = translate * width`` (resp. height) when ``translate < 1`` (the
    Keras convention). ``flips``: each axis is mirrored with probability 1/2. ``intensity``: the image
    becomes ``image * (1 + u) + v`` with ``u, v`` uniform in ``[-intensity, intensity]`` (z-score units).
    Areas moved in from outside are 0 in the image and background (0) in the label.
    ``image_mode`` is ``"bilinear"`` (default) or ``"nearest"``.

    The transform drawn depends only on ``(seed, epoch, index)``; flips and intensity are drawn after
    the affine part, so switching them on leaves the affine draws unchanged. :meth:`batch` transforms a
    minibatch on its device (one affine grid per item); calling the object transforms one item (torch
    tensors or numpy arrays, outputs of the input's type and dtype) exactly as :meth:`batch` does.
    """

    def __init__(
        self,
        rotation: float = 45.0,
        zoom=(0.8, 1.2),
        translate: float = 25.6,
        seed: int = 0,
        image_mode: str = "bilinear",
        flips: bool = False,
        intensity: float = 0.0,
    ):
        if rotation < 0 or translate < 0 or intensity < 0:
            raise ValueError("rotation, translate and intensity must be >= 0")
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
        self.flips = bool(flips)
        self.intensity = float(intensity)

    def __repr__(self) -> str:
        extra = (", flips=True" if self.flips else "") + (f", intensity={self.intensity}" if self.intensity else "")
        return (f"RandomAffine2D(rotation={self.rotation}, zoom={self.zoom}, translate={self.translate}, "
                f"seed={self.seed}, image_mode={self.image_mode!r}{extra})")

    def _rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF])

    def params(self, *, epoch: int, index: int, size) -> tuple[float, float, float, float]:
        """The affine transform for ``(epoch, index)`` on an image of ``size = (H, W)``:
        ``(angle_degrees, zoom, shift_x_pixels, shift_y_pixels)``."""
        return self._draw(self._rng(epoch, index), size)

    def _draw(self, rng: np.random.Generator, size) -> tuple[float, float, float, float]:
        h, w = (int(s) for s in size)
        angle = rng.uniform(-self.rotation, self.rotation)
        zoom = rng.uniform(*self.zoom)
        tx_max = self.translate * w if self.translate < 1 else self.translate
        ty_max = self.translate * h if self.translate < 1 else self.translate
        tx = rng.uniform(-tx_max, tx_max)
        ty = rng.uniform(-ty_max, ty_max)
        return float(angle), float(zoom), float(tx), float(ty)

    @staticmethod
    def theta(angle: float, zoom: float, tx: float, ty: float, size, flip=(False, False)) -> torch.Tensor:
        """The ``[2, 3]`` matrix for ``F.affine_grid`` (``align_corners=False``) of the transform.

        Output pixel ``p`` samples input pixel ``R(-angle) (p - t) / zoom`` about the image
        centre, i.e. the content is rotated by ``angle``, scaled by ``zoom`` and then shifted by
        ``(tx, ty)`` pixels (and mirrored along x, y where ``flip`` says so). Works in pixel units,
        so non-square images are not sheared.
        """
        h, w = (int(s) for s in size)
        a = math.radians(angle)
        c, s = math.cos(a), math.sin(a)
        m = np.array([[c, s], [-s, c]], dtype=np.float64) / zoom  # R(-a) / zoom
        m = np.diag([-1.0 if flip[0] else 1.0, -1.0 if flip[1] else 1.0]) @ m
        scale = np.array([w / 2.0, h / 2.0])
        lin = m * scale[None, :] / scale[:, None]  # S^-1 M S
        off = -(m @ np.array([tx, ty])) / scale  # -S^-1 M t
        return torch.tensor(np.concatenate([lin, off[:, None]], axis=1), dtype=torch.float32)

    def _item(self, epoch: int, index: int, size) -> tuple[torch.Tensor, float, float]:
        """Item ``index``'s affine matrix, intensity gain and offset."""
        rng = self._rng(epoch, index)
        move = self._draw(rng, size)
        flip = (bool(rng.random() < 0.5), bool(rng.random() < 0.5)) if self.flips else (False, False)
        gain, offset = (1.0 + rng.uniform(-self.intensity, self.intensity), rng.uniform(-self.intensity, self.intensity)) \
            if self.intensity else (1.0, 0.0)
        return self.theta(*move, size=size, flip=flip), gain, offset

    def batch(self, images: torch.Tensor, labels: torch.Tensor | None, *, epoch: int, indices):
        """Transform floating-point ``images [B, C, H, W]`` and integer ``labels [B, H, W]`` (or None) on their
        device: item ``k`` as item ``indices[k]`` of ``epoch``."""
        b, channels, h, w = images.shape
        items = [self._item(epoch, int(i), (h, w)) for i in indices]
        theta = torch.stack([t for t, _, _ in items]).to(images.device)
        grid = F.affine_grid(theta, [b, channels, h, w], align_corners=False)
        if self.intensity:
            gain = torch.tensor([g for _, g, _ in items], dtype=images.dtype, device=images.device)
            offset = torch.tensor([o for _, _, o in items], dtype=images.dtype, device=images.device)
            images = images * gain[:, None, None, None] + offset[:, None, None, None]
        out = F.grid_sample(images, grid.to(images.dtype), mode=self.image_mode, padding_mode="zeros",
                            align_corners=False)
        if labels is None:
            return out, None
        moved = F.grid_sample(labels[:, None].to(torch.float32), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[:, 0]
        return out, moved.round().to(labels.dtype)

    def __call__(self, image, label=None, *, epoch: int, index: int):
        as_numpy = isinstance(image, np.ndarray)
        img = torch.as_tensor(np.asarray(image)) if as_numpy else image
        squeeze = img.dim() == 2
        if squeeze:
            img = img[None]
        if img.dim() != 3:
            raise ValueError(f"expected an image [C, H, W] or [H, W], got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        lab = None
        if label is not None:
            lab = torch.as_tensor(np.asarray(label)) if isinstance(label, np.ndarray) else label
            if tuple(lab.shape[-2:]) != (h, w) or lab.dim() != 2:
                raise ValueError(f"label shape {tuple(lab.shape)} does not match image size {(h, w)}")
        work = img if img.is_floating_point() else img.to(torch.float32)
        out, moved = self.batch(work[None], None if lab is None else lab[None], epoch=epoch, indices=[index])
        out = out[0] if img.is_floating_point() else out[0].round().to(img.dtype)
        if squeeze:
            out = out[0]
        if as_numpy:
            out = out.numpy()
        if moved is None:
            return out, None
        return out, (moved[0].numpy() if isinstance(label, np.ndarray) else moved[0])

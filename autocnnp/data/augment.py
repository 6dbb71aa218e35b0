"""Seeded 2D and 3D affine data augmentation (thesis Table 2.1, left-atrium dataset).

Table 2.1 lists rotation in [-45, 45] degrees, zoom in [0.8, 1.2] and translation of up to 25.6
pixels along x and along y (5 % of the 512-pixel slices, Keras' ``width_shift_range`` /
``height_shift_range``). :class:`RandomAffine2D` draws one such transform per ``(seed, epoch,
index)`` and applies it identically to the image (bilinear) and to its label map (nearest
neighbour), so augmentation is reproducible on any rank and in any DataLoader worker.
:class:`RandomAffine3D` does the same to 3D patches ``[C, D, H, W]`` (rotation in the H-W plane and
tilts out of it, zoom, shifts, flips of each axis, intensity and gamma), batched on the device.
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
        gamma: float = 0.0,
    ):
        if rotation < 0 or translate < 0 or intensity < 0 or not 0 <= gamma < 1:
            raise ValueError("rotation, translate and intensity must be >= 0, gamma in [0, 1)")
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
        self.gamma = float(gamma)

    def _extra(self) -> str:
        return ((", flips=True" if self.flips else "") + (f", intensity={self.intensity}" if self.intensity else "")
                + (f", gamma={self.gamma}" if self.gamma else ""))

    def __repr__(self) -> str:
        extra = self._extra()
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
        a = math.radians(angle)
        c, s = math.cos(a), math.sin(a)
        m = np.array([[c, s], [-s, c]], dtype=np.float64) / zoom  # R(-a) / zoom
        return _grid_matrix(m, (tx, ty), size, flip)

    def _item(self, epoch: int, index: int, size) -> tuple[torch.Tensor, float, float, float]:
        """Item ``index``'s affine matrix, intensity gain and offset, and gamma exponent."""
        rng = self._rng(epoch, index)
        move = self._draw(rng, size)
        flip = tuple(bool(rng.random() < 0.5) for _ in size) if self.flips else (False,) * len(size)
        gain, offset = (1.0 + rng.uniform(-self.intensity, self.intensity), rng.uniform(-self.intensity, self.intensity)) \
            if self.intensity else (1.0, 0.0)
        gamma = float(np.exp(rng.uniform(math.log(1 - self.gamma), -math.log(1 - self.gamma)))) if self.gamma else 1.0
        return self.theta(*move, size=size, flip=flip), gain, offset, gamma

    def batch(self, images: torch.Tensor, labels: torch.Tensor | None, *, epoch: int, indices):
        """Transform floating-point ``images [B, C, *size]`` and integer ``labels [B, *size]`` (or None) on their
        device: item ``k`` as item ``indices[k]`` of ``epoch``."""
        size = tuple(images.shape[2:])
        items = [self._item(epoch, int(i), size) for i in indices]
        theta = torch.stack([item[0] for item in items]).to(images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        each = (-1,) + (1,) * (images.dim() - 1)  # one value per item
        if self.intensity:
            gain = torch.tensor([item[1] for item in items], dtype=images.dtype, device=images.device)
            offset = torch.tensor([item[2] for item in items], dtype=images.dtype, device=images.device)
            images = images * gain.view(each) + offset.view(each)
        if self.gamma:  # each item's intensities mapped to [0, 1], raised to its power, mapped back
            power = torch.tensor([item[3] for item in items], dtype=images.dtype, device=images.device).view(each)
            low = images.amin(dim=tuple(range(1, images.dim())), keepdim=True)
            span = images.amax(dim=tuple(range(1, images.dim())), keepdim=True) - low
            images = ((images - low) / span.clamp_min(1e-6)) ** power * span + low
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


def _grid_matrix(m: np.ndarray, shift, size, flip) -> torch.Tensor:
    """The ``F.affine_grid`` matrix ``[n, n + 1]`` (``align_corners=False``) of the pixel-unit map ``m`` (axes
    x = last, y, z = first of ``size``) followed by the pixel ``shift`` about the centre, mirrored where ``flip``
    says so (``flip`` in the order of ``m``'s axes); in pixel units, so non-cubic grids are not sheared."""
    m = np.diag([-1.0 if f else 1.0 for f in flip]) @ m
    scale = np.array([n / 2.0 for n in reversed(tuple(int(s) for s in size))])
    lin = m * scale[None, :] / scale[:, None]  # S^-1 M S
    off = -(m @ np.asarray(shift, dtype=np.float64)) / scale  # -S^-1 M t
    return torch.tensor(np.concatenate([lin, off[:, None]], axis=1), dtype=torch.float32)


class RandomAffine3D(RandomAffine2D):
    """:class:`RandomAffine2D` for 3D patches ``[C, D, H, W]`` with labels ``[D, H, W]``: the rotation is about
    the depth axis (in the H-W plane, ``rotation`` degrees), ``tilt`` degrees about each in-plane axis (keep it
    small on anisotropic data); zoom, shifts (``translate`` along H and W, and along D), flips of each axis,
    intensity and ``gamma`` as the 2D class (``gamma`` g: the exponent is log-uniform in [1 - g, 1 / (1 - g)])."""

    def __init__(self, rotation: float = 15.0, zoom=(0.85, 1.25), translate: float = 0.0, seed: int = 0,
                 flips: bool = True, intensity: float = 0.1, gamma: float = 0.3, tilt: float = 0.0):
        super().__init__(rotation, zoom, translate, seed, "bilinear", flips, intensity, gamma)
        if tilt < 0:
            raise ValueError("tilt must be >= 0")
        self.tilt = float(tilt)

    def __repr__(self) -> str:
        return (f"RandomAffine3D(rotation={self.rotation}, tilt={self.tilt}, zoom={self.zoom}, "
                f"translate={self.translate}, seed={self.seed}{self._extra()})")

    def _draw(self, rng: np.random.Generator, size) -> tuple[float, ...]:
        d, h, w = (int(s) for s in size)
        angle, zoom, tx, ty = super()._draw(rng, (h, w))
        tz_max = self.translate * d if self.translate < 1 else self.translate
        tilts = rng.uniform(-self.tilt, self.tilt, size=2) if self.tilt else (0.0, 0.0)
        return angle, float(tilts[0]), float(tilts[1]), zoom, tx, ty, float(rng.uniform(-tz_max, tz_max))

    @staticmethod
    def theta(angle: float, tilt_x: float, tilt_y: float, zoom: float, tx: float, ty: float, tz: float, size,
              flip=(False, False, False)) -> torch.Tensor:
        """The ``[3, 4]`` ``F.affine_grid`` matrix: rotation by ``angle`` in the H-W plane, ``tilt_x`` /
        ``tilt_y`` degrees about the W / H axes, zoom, then shifts ``(tx, ty, tz)`` voxels along W, H, D."""
        def rot(a: float, i: int, j: int) -> np.ndarray:
            r, c, s = np.eye(3), math.cos(math.radians(a)), math.sin(math.radians(a))
            r[i, i], r[i, j], r[j, i], r[j, j] = c, s, -s, c
            return r

        m = rot(angle, 0, 1) @ rot(tilt_x, 1, 2) @ rot(tilt_y, 0, 2) / zoom  # R(-a) / zoom, axes (W, H, D)
        return _grid_matrix(m, (tx, ty, tz), size, tuple(reversed(flip)))

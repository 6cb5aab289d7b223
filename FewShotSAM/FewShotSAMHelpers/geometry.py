"""Volume node <-> numpy array, and numpy-order voxel index <-> RAS millimetres."""

from __future__ import annotations

from typing import Optional

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
import slicer.util

from FewShotSAMLib.errors import UserInputError


def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJKToRAS matrix (columns i, j, k)."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def index_to_ras_matrix(volume_node) -> np.ndarray:
    """4x4 matrix mapping homogeneous numpy-order indices (k, j, i, 1) to RAS millimetres."""
    return ijk_to_ras(volume_node)[:, [2, 1, 0, 3]]


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


def volume_shape(volume_node) -> tuple:
    """The volume's voxel counts in numpy order (k, j, i)."""
    return tuple(reversed(volume_node.GetImageData().GetDimensions()))


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
    return slicer.util.arrayFromVolume(volume_node).copy()


def add_volume_node(scene, array: np.ndarray, ijk_to_ras_matrix: np.ndarray, name: str = "Volume"):
    """A new scalar volume node in ``scene`` holding a copy of ``array`` (numpy order) with the geometry
    ``ijk_to_ras_matrix`` (``slicer.util.addVolumeFromArray`` for any scene, not only ``slicer.mrmlScene``)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras_matrix, dtype=float)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CreateDefaultDisplayNodes()
    return node


def oriented_image_like(volume_node, array: Optional[np.ndarray] = None):
    """A vtkOrientedImageData with the volume's geometry, holding ``array`` (uint8) when given."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*volume_node.GetImageData().GetDimensions())
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(volume_node)))
    if array is not None:
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        oriented_image_array(image)[:] = np.asarray(array).astype(np.uint8)
    return image


def oriented_image_array(image) -> np.ndarray:
    """The voxels of a vtkOrientedImageData in numpy order (a view, not a copy)."""
    ext = image.GetExtent()
    shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def grid_matrices(labelmap, volume_node) -> tuple[np.ndarray, np.ndarray]:
    """The labelmap's image-to-world and the volume's IJK-to-RAS 4x4 matrices."""
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m), ijk_to_ras(volume_node)


def voxel_offset(lab: np.ndarray, vol: np.ndarray) -> np.ndarray:
    """Where the labelmap's IJK origin lies in the volume's IJK frame, in voxels (fractional)."""
    return np.linalg.solve(vol[:3, :3], lab[:3, 3] - vol[:3, 3])


def same_grid(labelmap, volume_node, tol: float = 1e-3) -> bool:
    """True when the labelmap's voxels are the volume's voxels (same axes and spacing, whole-voxel offset)."""
    lab, vol = grid_matrices(labelmap, volume_node)
    if not np.allclose(lab[:3, :3], vol[:3, :3], atol=tol * max(1.0, np.abs(vol[:3, :3]).max())):
        return False
    offset = voxel_offset(lab, vol)
    return bool(np.allclose(offset, np.round(offset), atol=0.05))

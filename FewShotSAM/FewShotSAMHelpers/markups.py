"""Prompts <-> markups point lists: one list of foreground and one of background points per output segment,
each point at its voxel's RAS position and labelled with its slice; the lists the place-point buttons fill;
where the module's nodes sit in the subject hierarchy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

import slicer

from .geometry import index_to_ras, ras_to_index

log = logging.getLogger(__name__)

FG_COLOR = (0.10, 0.85, 0.20)
BG_COLOR = (0.95, 0.15, 0.15)
ATTRIBUTE_PREFIX = "FewShotSAM."
ROLES = ("foreground", "background")


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




def create_prompt_lists(volume_node, segmentation_node, segment_id: str) -> tuple:
    """The (foreground, background) point lists of an output segment: new nodes in the segmentation's
    scene, named after the segment, under the volume's transform and beside it in the subject hierarchy."""
    scene = segmentation_node.GetScene()
    name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
    transform = volume_node.GetTransformNodeID()
    nodes = []
    for role, color in zip(ROLES, (FG_COLOR, BG_COLOR)):
        node = create_point_list(scene, f"{name} {role} prompts", color, transform)
        node.SetAttribute(ATTRIBUTE_PREFIX + "Role", role)
        node.SetAttribute(ATTRIBUTE_PREFIX + "Segmentation", segmentation_node.GetID())
        node.SetAttribute(ATTRIBUTE_PREFIX + "Segment", segment_id)
        place_beside_volume(node, volume_node)
        nodes.append(node)
    return tuple(nodes)


def start_placing(point_list, selection_node, interaction_node, persistent: bool = False) -> None:
    """Make the next click in a view add a point to ``point_list`` (what a place-point button does): the
    list becomes the active place node of ``selection_node`` and ``interaction_node`` enters place mode
    (one point, or until the user leaves place mode when ``persistent``)."""
    selection_node.SetReferenceActivePlaceNodeClassName(point_list.GetClassName())
    selection_node.SetActivePlaceNodeID(point_list.GetID())
    interaction_node.SetPlaceModePersistence(1 if persistent else 0)
    interaction_node.SetCurrentInteractionMode(interaction_node.Place)

"""Pieces and holes of a mask on one slice (FewShotSAMLib/shape.py), on small arrays."""

import numpy as np

from FewShotSAMLib.shape import (ShapeRules, analyse_slice, components, fill_holes, holes, inner_point,
                                 overlap_fraction, widened_box)


def ring(size=20, centre=(10, 10), outer=7, inner=3):
    r, c = np.mgrid[:size, :size]
    d = np.hypot(r - centre[0], c - centre[1])
    return (d <= outer) & (d > inner)


def test_components_largest_first_with_minimum_size():
    m = np.zeros((12, 12), bool)
    m[1:4, 1:4] = True  # 9 px
    m[6:11, 6:11] = True  # 25 px
    m[0, 11] = True  # 1 px
    parts = components(m, min_pixels=2)
    assert [int(p.sum()) for p in parts] == [25, 9]
    assert not (parts[0] & parts[1]).any()
    assert len(components(m)) == 3


def test_diagonal_pixels_are_one_piece():
    m = np.eye(5, dtype=bool)
    assert len(components(m)) == 1


def test_hole_of_a_ring_and_not_of_a_cup():
    m = ring()
    hs = holes(m)
    assert len(hs) == 1
    assert hs[0][10, 10] and not (hs[0] & m).any()
    assert np.array_equal(fill_holes(m), m | hs[0])
    cup = m.copy()
    cup[10:, 8:13] = False  # cut the ring open towards the bottom: the cavity is no longer enclosed
    assert holes(cup) == []


def test_diagonal_ring_encloses_its_hole():
    r, c = np.mgrid[:9, :9]
    diamond = (np.abs(r - 4) + np.abs(c - 4)) == 2  # a ring joined only through diagonal steps
    assert len(components(diamond)) == 1
    hs = holes(diamond)
    assert len(hs) == 1 and int(hs[0].sum()) == 5 and hs[0][4, 4]


def test_analyse_two_pieces_one_with_a_hole_and_small_debris_dropped():
    m = np.zeros((40, 60), bool)
    m[:20, :20] = ring()
    m[20:35, 35:55] = True  # 300 px solid
    m[38, 2] = True  # debris
    shape = analyse_slice(m, ShapeRules(min_piece_fraction=0.05, min_piece_pixels=4, min_hole_pixels=4))
    assert len(shape.pieces) == 2
    assert int(shape.pieces[0].sum()) == 300  # largest first
    assert len(shape.holes) == 1 and shape.hole_owner == [1]
    assert shape.holes_of(0) == [] and len(shape.holes_of(1)) == 1
    assert not shape.is_simple


def test_tiny_holes_and_pieces_are_ignored_by_the_rules():
    m = np.zeros((30, 30), bool)
    m[5:25, 5:25] = True
    m[10, 10] = False  # one-pixel hole: painting noise
    shape = analyse_slice(m)
    assert shape.is_simple and len(shape.pieces) == 1 and not shape.holes
    # a larger hole counts
    m[12:16, 12:16] = False
    shape = analyse_slice(m)
    assert len(shape.holes) == 1 and int(shape.holes[0].sum()) == 16


def test_rules_scale_with_the_frame():
    m = np.zeros((30, 30), bool)
    m[5:25, 5:25] = True
    m[12:14, 12:14] = False  # 4 px hole
    assert len(analyse_slice(m, ShapeRules(min_hole_pixels=3), scale=1.0).holes) == 1
    assert len(analyse_slice(m, ShapeRules(min_hole_pixels=3), scale=2.0).holes) == 0  # needs 12 px at 512


def test_empty_mask():
    shape = analyse_slice(np.zeros((5, 5), bool))
    assert shape.pieces == [] and shape.holes == [] and shape.is_simple


def test_inner_point_is_deepest_and_inside():
    m = np.zeros((20, 20), bool)
    m[2:18, 5:9] = True
    p = inner_point(m)
    assert m[int(p[0]), int(p[1])] and 6 <= p[1] <= 7
    h = holes(ring())[0]
    p = inner_point(h)
    assert h[int(p[0]), int(p[1])] and abs(p[0] - 10) <= 1 and abs(p[1] - 10) <= 1
    assert inner_point(np.zeros((3, 3), bool)) is None


def test_overlap_fraction():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:5] = True
    b[3:4, :5] = True
    assert overlap_fraction(a, b) == 1.0
    assert overlap_fraction(a, np.zeros_like(a)) == 0.0
    b[:] = False
    b[6:] = True
    assert overlap_fraction(a, b) == 0.0


def test_widened_box_moves_only_the_sides_the_mask_reaches_and_stops_at_the_limits():
    limits = np.array([0, 0, 31, 31], np.float32)
    box = np.array([10, 10, 20, 20], np.float32)
    m = np.zeros((32, 32), bool)
    m[12:18, 14:21] = True  # reaches the right side (col 20) only
    np.testing.assert_array_equal(widened_box(m, box, 4, limits), [10, 10, 20, 24])
    m[10, 14] = True  # and the top, within the 1-pixel touch
    np.testing.assert_array_equal(widened_box(m, box, 4, limits), [6, 10, 20, 24])
    inside = np.zeros_like(m)
    inside[13:17, 13:17] = True
    assert widened_box(inside, box, 4, limits) is None
    assert widened_box(np.zeros_like(m), box, 4, limits) is None
    at_edge = np.zeros_like(m)
    at_edge[20:32, 20:32] = True
    edge_box = np.array([20, 20, 31, 31], np.float32)
    np.testing.assert_array_equal(widened_box(at_edge, edge_box, 4, limits), [16, 16, 31, 31])
    assert widened_box(at_edge, np.array([0, 0, 31, 31], np.float32), 4, limits) is None  # already at the limits

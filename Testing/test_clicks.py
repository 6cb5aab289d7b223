"""The simulated user of the click benchmark and of the point-decoder training (FewShotSAMLib/clicks.py)."""

from __future__ import annotations

import numpy as np

from FewShotSAMLib.clicks import Click, clicks_to_reach, corrective_click, dice, interior_point


def test_interior_point_is_the_centre_of_a_rectangle_and_counts_the_border_as_outside():
    region = np.zeros((40, 40), bool)
    region[10:21, 5:30] = True  # 11 rows: centre row 15
    r, c = interior_point(region)
    assert r == 15 and 10 <= c <= 24
    edge = np.zeros((20, 20), bool)
    edge[:, :9] = True  # touches the image border: the interior point keeps away from it too
    assert interior_point(edge)[1] == 4


def test_click_goes_to_the_largest_error_region_with_its_kind():
    truth = np.zeros((64, 64), bool)
    truth[10:40, 10:40] = True
    pred = truth.copy()
    pred[10:40, 30:40] = False  # missed: 300 px
    pred[50:55, 50:55] = True  # leaked: 25 px
    click = corrective_click(pred, truth)
    assert click == Click(click.point, True)
    r, c = click.point
    assert 14 <= r <= 35 and 34 <= c <= 35  # 5 px from every edge of the missed 30 x 10 strip
    pred[10:40, 30:40] = True
    pred[0:8, 0:60] = True  # leak larger than anything missed
    click = corrective_click(pred, truth)
    assert not click.foreground and click.point[0] < 8
    assert corrective_click(truth, truth) is None
    # errors outside ``valid`` do not count
    valid = np.ones_like(truth)
    valid[0:8] = False
    assert corrective_click(pred, truth, valid).foreground is False
    assert corrective_click(pred, truth, valid).point[0] >= 50


def test_noc_and_dice():
    assert clicks_to_reach([70, 84, 86, 91], 85) == 2
    assert clicks_to_reach([95], 90) == 0
    assert clicks_to_reach([50, 60], 90) is None
    a = np.zeros((5, 5), bool)
    assert dice(a, a) == 100.0
    b = a.copy()
    b[0, 0] = True
    assert dice(a, b) == 0.0 and dice(b, b) == 100.0

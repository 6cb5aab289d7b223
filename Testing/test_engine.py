"""The volume engine: extent rules, connectivity, painted slices, forced ranges, cancel, encode-once, and
end-to-end accuracy on real CHAOS MRI with the embedded LiteMedSAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CHAOS_DIR, SHARED_EMBEDDINGS, require
from FewShotSAMLib.corrections import changes_at_points, previous_answer_of_piece
from FewShotSAMLib.engine import ExtentRules, TargetEvidence, VolumeSession, keep_connected_to
from FewShotSAMLib.extent import accept_slice
from FewShotSAMLib.errors import CancelledError, UserInputError
from FewShotSAMLib.prompts.base import Support
from FewShotSAMLib.volume import painted_slices, read_volume

# Floors measured with boxprop + LiteMedSAM on CHAOS volume 1 (docs/RESULTS.md, "engine floors"):
# liver 87.0, right kidney 94.4; the floors leave a few points for CPU/BLAS differences.
LIVER_FLOOR = 83.0
KIDNEY_FLOOR = 90.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 200.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def blob_volume(n=9, size=64, half_depth=None):
    """A bright ellipsoid in a noisy dark volume: a target SAM finds easily (for the engine's flow).
    ``half_depth`` (slices; default n / 2.6) is how far it reaches either side of the middle slice."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:n, :size, :size]
    half_depth = half_depth or n / 2.6
    blob = ((z - n // 2) / half_depth) ** 2 + ((y - 30) / 14.0) ** 2 + ((x - 34) / 11.0) ** 2 < 1
    image = rng.normal(100, 10, (n, size, size)) + 400 * blob
    return image.astype(np.float32), blob


@pytest.fixture(scope="module")
def blob_session(litemedsam):
    image, blob = blob_volume()
    return VolumeSession(image, (3.0, 1.0, 1.0), sam=litemedsam), blob


def test_accept_rules():
    rules = ExtentRules()
    sup = np.zeros((32, 32), bool)
    sup[8:24, 8:24] = True
    good = np.zeros_like(sup)
    good[9:23, 9:23] = True
    assert accept_slice(good, 0.9, 1.0, sup, sup, rules)
    assert not accept_slice(good, 0.1, 1.0, sup, sup, rules)  # SAM unsure
    shifted = np.zeros_like(sup)
    shifted[9:25, 9:25] = True  # as large as its neighbour, partly outside it
    assert accept_slice(shifted, 0.9, 1.0, sup, sup, rules)
    assert not accept_slice(shifted, 0.9, 0.2, sup, sup, rules)  # generator says absent
    # ... but not where the answer narrows inside its neighbour's (an organ's tip): the target goes on
    assert good.sum() < rules.tip_shrink * sup.sum() and accept_slice(good, 0.9, 0.2, sup, sup, rules)
    assert not accept_slice(good, 0.9, 0.2, sup, sup, ExtentRules(tip_shrink=0.0))
    outside = np.zeros_like(sup)
    outside[14:28, 14:28] = True  # as small, but less than 80 % of it inside the neighbour's answer
    assert not accept_slice(outside, 0.9, 0.2, sup, sup, rules)
    tiny = np.zeros_like(sup)
    tiny[10, 10] = True
    assert not accept_slice(tiny, 0.9, 1.0, sup, sup, rules)  # vanished
    moved = np.zeros_like(sup)
    moved[0:6, 26:32] = True
    assert not accept_slice(moved, 0.9, 1.0, sup, sup, rules)  # lost overlap with its neighbour
    huge = np.ones_like(sup)
    assert not accept_slice(huge, 0.9, 1.0, sup, sup, rules)  # exploded


def test_target_evidence_separates_target_from_surroundings():
    rng = np.random.default_rng(0)
    target_vec, ring_vec = rng.normal(size=16), rng.normal(size=16)
    emb = np.tile(ring_vec[:, None, None], (1, 16, 16)) + 0.1 * rng.normal(size=(16, 16, 16))
    emb[:, 4:12, 4:12] += target_vec[:, None, None] - ring_vec[:, None, None]
    emb = torch.tensor(emb, dtype=torch.float32)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    ev = TargetEvidence(Support(emb, mask), (3, 12), 64)
    assert ev.score(emb, mask) > 0.5
    off = np.zeros_like(mask)
    off[0:10, 50:64] = True
    assert ev.score(emb, off) < 0


def test_keep_connected_to_drops_islands():
    seed = np.zeros((5, 10, 10), bool)
    seed[2, 2:4, 2:4] = True
    mask = np.zeros_like(seed)
    mask[1:4, 2:5, 2:5] = True
    mask[0, 8, 8] = True  # an island
    out = keep_connected_to(mask, seed)
    assert out[1:4, 2:5, 2:5].all() and not out[0, 8, 8]


def test_keep_connected_to_with_more_components_than_16_bit_labels_hold():
    mask = np.zeros((70, 70, 70), bool)
    mask[::2, ::2, ::2] = True  # 35**3 = 42875 isolated voxels: more than int16 labels can number
    mask[0, 0, 1] = True  # joins (0, 0, 0) and (0, 0, 2): the seed's component
    seed = np.zeros_like(mask)
    seed[0, 0, 0] = True
    before = mask.copy()
    out = keep_connected_to(mask, seed)
    assert sorted(map(tuple, np.argwhere(out).tolist())) == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]
    np.testing.assert_array_equal(mask, before)  # the caller's mask is not modified


def test_blob_auto_extent_painted_slice_and_encode_once(blob_session):
    session, blob = blob_session
    ex = np.zeros_like(blob)
    ex[4] = blob[4]
    ex[4, 30, 34] = True
    before = ex.copy()
    calls = []
    res = session.segment(ex, generator="boxprop", progress=lambda d, t: calls.append((d, t)))
    assert np.array_equal(ex, before)  # the user's example is never altered
    assert np.array_equal(res.mask[4], ex[4])  # painted slice kept as painted
    assert dice(res.mask, blob) > 80
    seg = res.segmented_slices
    true = painted_slices(blob, 0).tolist()
    assert abs(seg[0] - true[0]) <= 1 and abs(seg[-1] - true[-1]) <= 1
    assert calls and calls[-1][0] <= calls[-1][1]
    encoded = session.cache.encoded
    assert encoded <= blob.shape[0]
    session.segment(ex, generator="boxprop")  # a second target/run on the same volume re-encodes nothing
    assert session.cache.encoded == encoded
    assert set(res.prompts) == set(seg) - {4}
    assert all(p.box is not None for p in res.prompts.values())


def test_the_propagated_box_grows_with_a_widening_target(litemedsam):
    """A disc whose radius grows 3 px per slice outgrows the neighbour's box (3 px margin at 256, under
    1 px here): with a fixed box SAM's answer stays cut to it and shrinks; the growing box follows the
    target. The box recorded with each answer is the one decoded, so re-running the prompts gives the same
    mask."""
    from FewShotSAMLib.prompts.boxprop import BoxPropagation

    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:9, :64, :64]
    cone = np.hypot(y - 32, x - 32) < 6 + 3.0 * z
    image = (rng.normal(100, 10, cone.shape) + 400 * cone).astype(np.float32)
    session = VolumeSession(image, (3.0, 1.0, 1.0), sam=litemedsam)
    ex = np.zeros_like(cone)
    ex[1] = cone[1]
    fixed = session.segment(ex, generator=BoxPropagation(growth=0), extent=(0, 8))
    growing = session.segment(ex, generator=BoxPropagation(), extent=(0, 8))
    assert dice(growing.mask, cone) > dice(fixed.mask, cone) + 30
    assert growing.mask[5].sum() > 3 * fixed.mask[5].sum()
    again = session.segment_from_prompts(ex, 0, growing.prompts)
    assert np.array_equal(again.mask, growing.mask)


def test_propagation_encodes_no_slice_past_where_it_stops(litemedsam):
    """A propagation encodes the slices it decodes, the one where it stops, and beyond that at most a block
    of ``encode_ahead`` less one: none with OpenVINO, the CPU default, which runs slice by slice (reading a
    4-slice batch ahead had encoded up to three more per stop, a tenth of the encoder time of a CHAOS
    liver); up to ``batch_size - 1`` with PyTorch."""
    image, blob = blob_volume(n=25, half_depth=4.5)
    session = VolumeSession(image, (3.0, 1.0, 1.0), sam=litemedsam)
    ex = np.zeros_like(blob)
    ex[12] = blob[12]
    res = session.segment(ex, generator="boxprop")
    decoded = sorted(set(res.prompts) | {12})
    spare = litemedsam.encode_ahead - 1
    assert 1 + spare < decoded[0] and decoded[-1] < 23 - spare  # it stopped well inside the volume both ways
    pv = session.prepared(0)
    encoded = {i for i in range(pv.n_slices) if pv.key(i) in session.cache}
    assert set(range(decoded[0] - 1, decoded[-1] + 2)) <= encoded
    assert encoded <= set(range(decoded[0] - 1 - spare, decoded[-1] + 2 + spare))
    assert session.cache.encoded == len(encoded)


def test_forced_range_and_bad_ranges(blob_session):
    session, blob = blob_session
    ex = np.zeros_like(blob)
    ex[4] = blob[4]
    res = session.segment(ex, extent=(3, 5))
    assert set(res.segmented_slices) <= {3, 4, 5}
    with pytest.raises(UserInputError, match="outside the volume"):
        session.segment(ex, extent=(0, 99))
    with pytest.raises(UserInputError, match="empty"):
        session.segment(np.zeros_like(blob))
    with pytest.raises(UserInputError, match="shape"):
        session.segment(ex[:-1])


def test_cancel_stops_within_one_slice(blob_session):
    session, blob = blob_session
    ex = np.zeros_like(blob)
    ex[4] = blob[4]
    seen = []

    def cancel():
        return len(seen) >= 1

    with pytest.raises(CancelledError):
        session.segment(ex, progress=lambda d, t: seen.append(d), cancel=cancel)
    assert len(seen) == 1


def test_rerun_from_voxel_prompts_is_decoder_only(blob_session):
    session, blob = blob_session
    ex = np.zeros_like(blob)
    ex[4] = blob[4]
    res = session.segment(ex)
    k = sorted(res.prompts)[0]
    sp = res.prompts[k]
    encoded = session.cache.encoded
    prompts = session.prompts_from_voxels(0, sp.fg, sp.bg, sp.box)
    mask, score = session.decode_slice(0, k, prompts)
    assert session.cache.encoded == encoded
    assert np.isclose(score, sp.score, atol=1e-4)
    assert dice(mask, res.mask[k]) > 98


def test_previous_answer_of_a_piece_is_its_own_parts():
    from FewShotSAMLib.prompts.base import Prompts

    prev = np.zeros((40, 40), bool)
    prev[2:10, 2:10] = True  # piece A
    prev[25:35, 25:35] = True  # piece B
    prev[2:6, 30:36] = True  # a leak near neither box
    a = previous_answer_of_piece(prev, Prompts(box=np.array([1, 1, 11, 11])))
    assert a.sum() == 64 and a[5, 5] and not a[30, 30] and not a[3, 32]
    b = previous_answer_of_piece(prev, Prompts(fg_points=np.array([[30.0, 30.0]])))
    assert b.sum() == 100 and b[30, 30]
    assert not previous_answer_of_piece(prev, Prompts(fg_points=np.array([[20.0, 20.0]]))).any()
    prev[10, 10] = prev[11, 11] = True  # a tail touching piece A at a corner belongs to it (8-connected)
    assert previous_answer_of_piece(prev, Prompts(box=np.array([1, 1, 9, 9])))[11, 11]


def test_a_correction_changes_only_where_its_points_ask():
    prev = np.zeros((40, 40), bool)
    prev[10:20, 10:20] = True
    new = np.zeros_like(prev)
    new[10:20, 14:26] = True  # SAM's new answer: grows right, shrinks left
    new[30:35, 30:35] = True  # and a blob far from any point
    none = np.zeros((0, 2))
    grown = changes_at_points(prev, new, np.array([[15, 23]]), none)  # a foreground click in the growth
    assert grown[15, 23] and grown[15, 11] and not grown[32, 32]  # the shrink and the far blob are not taken
    assert grown.sum() == prev.sum() + 60
    cut = changes_at_points(prev, new, none, np.array([[15, 11]]))  # a background click in the shrink
    assert not cut[15, 11] and not cut[15, 23] and cut.sum() == prev.sum() - 40
    # a click's direction matters: a foreground point in a region SAM removes takes nothing
    assert np.array_equal(changes_at_points(prev, new, np.array([[15, 11]]), none), prev)
    assert np.array_equal(changes_at_points(prev, prev, np.array([[15, 15]]), none), prev)


def test_a_clicks_change_stays_near_it_with_spread():
    """With ``spread`` a click takes its region only within spread x its distance to the answer's edge: a
    foreground click 3 px outside the answer adds at most a disk of radius 9 px around it, not the whole
    leak SAM's new answer runs along."""
    prev = np.zeros((60, 60), bool)
    prev[20:40, 10:20] = True
    new = prev.copy()
    new[20:40, 20:58] = True  # grows right over 38 columns
    none = np.zeros((0, 2))
    click = np.array([[30, 22]])  # 3 px from the answer's edge (column 19)
    whole = changes_at_points(prev, new, click, none)
    assert whole[30, 50]  # without spread the whole growth is taken
    near = changes_at_points(prev, new, click, none, spread=3.0)
    assert near[30, 22] and near[30, 30] and not near[30, 32] and not near[30, 50]
    assert np.array_equal(near & ~prev, near & ~prev & new)  # only what SAM's answer adds
    # a background click: the cut reaches 3 x the click's distance to the answer's background
    cut = changes_at_points(new, prev, none, np.array([[30, 50]]), spread=3.0)  # 8 px from the edge (column 58)
    assert not cut[30, 50] and not cut[30, 30] and cut[30, 25]


def test_a_background_click_clears_around_it():
    from FewShotSAMLib.corrections import clear_around

    m = np.zeros((80, 80), bool)
    m[10:70, 10:70] = True  # a 60 x 60 answer; equivalent radius 33.9 px
    out = clear_around(m, np.array([[14, 40]]), radius=1.5, cap=0.5)  # 5 px from the edge: a 7.5 px disk
    assert not out[14, 40] and not out[14, 47] and out[14, 48] and out[30, 40]
    assert out.sum() > m.sum() - np.pi * 8 ** 2
    deep = clear_around(m, np.array([[40, 40]]), radius=1.5, cap=0.5)  # 31 px deep: capped at 16.9 px
    assert not deep[40, 56] and deep[40, 57]
    assert np.array_equal(clear_around(m, np.array([[5, 5]])), m)  # a point outside the answer clears nothing


def test_a_click_takes_the_tissue_like_it():
    """``tissue_like_clicks``: a foreground click outside the answer adds the connected tissue like it, up to
    1.5 x its distance to the answer; a background click inside removes it the same way; nothing for a click
    already on its side or on a slice without an answer."""
    from FewShotSAMLib.corrections import tissue_like_clicks

    prev = np.zeros((60, 60), bool)
    prev[20:40, 10:20] = True
    image = np.full((60, 60), 0.9, np.float32)
    image[15:45, 10:30] = 0.5  # the target: the answer and, beside it, the part it missed
    none = np.zeros((0, 2))
    click = np.array([[30, 26]])  # 7 px from the answer: a 10.5 px reach
    added = tissue_like_clicks(prev, click, none, image) & ~prev
    assert added[30, 20] and added[30, 29] and added[22, 24] and not added[30, 30]  # stops at the unlike column
    assert not added[17, 26]  # beyond the reach
    assert np.array_equal(tissue_like_clicks(prev, np.array([[30, 15]]), none, image), prev)  # inside already
    assert not tissue_like_clicks(np.zeros_like(prev), click, none, image).any()  # no answer: SAM decides

    big = np.zeros((80, 80), bool)
    big[10:70, 10:70] = True  # a background click 30 px deep: a 45 px reach
    image = np.full((80, 80), 0.5, np.float32)
    image[50:, :] = 0.9  # rows 50-69 of the answer look different from the click
    cleared = tissue_like_clicks(big, none, np.array([[40, 40]]), image)
    assert not cleared[10:50, 10:70].any() and cleared[50:70, 10:70].all()
    image[38:43, 38:43] = 0.0  # a click on a speck unlike its surroundings removes the speck only
    speck = tissue_like_clicks(big, none, np.array([[40, 40]]), image)
    assert not speck[38:43, 38:43].any() and speck.sum() == big.sum() - 25


def test_the_session_applies_the_tissue_rules_on_a_known_slice(blob_session, monkeypatch):
    """``corrected_slice`` with the slice index adds the tissue like a foreground click (the blob's bright
    half beside an answer that missed it) even where SAM's answers add nothing; without the index, or with
    ``click_tissue`` off, it does not."""
    session, blob = blob_session
    monkeypatch.setattr(session, "decode_slice", lambda axis, index, prompts: (np.zeros((64, 64), bool), 0.5))
    prev = blob[4].copy()
    prev[:, 34:] = False  # the answer misses the blob's right half
    fg = np.array([[4, 30, 40]])  # 6 px right of the answer's edge, on the bright blob
    out = session.corrected_slice(0, prev, prev, fg, np.zeros((0, 3)), index=4)
    assert out[30, 40] and out[30, 44] and not (out & ~blob[4]).any()  # the blob's tissue only
    assert np.array_equal(session.corrected_slice(0, prev, prev, fg, np.zeros((0, 3))), prev)
    monkeypatch.setattr(session, "click_tissue", False)
    assert np.array_equal(session.corrected_slice(0, prev, prev, fg, np.zeros((0, 3)), index=4), prev)


def test_clicks_sam_does_not_follow_still_act(blob_session, monkeypatch):
    """A foreground click outside SAM's corrected answer adds SAM's answer to the click alone (near it); a
    background click still inside clears around it; ``click_fallback = False`` leaves the answer as SAM's
    (the tissue rule off: this answer lies on the volume's noise, which looks the same everywhere)."""
    session, _ = blob_session
    monkeypatch.setattr(session, "click_tissue", False)
    prev = np.zeros((64, 64), bool)
    prev[20:40, 10:20] = True
    alone = np.zeros_like(prev)
    alone[45:55, 30:40] = True  # what SAM answers to the foreground point alone
    monkeypatch.setattr(session, "decode_slice", lambda axis, index, prompts: (alone, 0.9))
    fg, bg = np.array([[7, 50, 35]]), np.array([[7, 30, 15]])  # voxel indices on slice 7
    out = session.corrected_slice(0, prev, prev, fg, bg, index=7)  # SAM's re-run changed nothing
    assert out[50, 35] and out[46, 31] and not out[30, 15] and out[21, 11]
    monkeypatch.setattr(session, "click_fallback", False)
    assert np.array_equal(session.corrected_slice(0, prev, prev, fg, bg, index=7), prev)


def test_a_click_on_a_slice_without_an_answer_stays_near_the_nearest_answer():
    """``nearest_answered`` finds the nearest other slice with an answer (however far, or within a limit),
    ``nearest_answer`` that slice's answer; ``within_nearby`` keeps an answer within that slice's answer
    grown by a share of its equivalent radius, at least 3 px, and leaves it as it is without one."""
    from FewShotSAMLib.corrections import nearest_answer, nearest_answered, within_nearby

    assert nearest_answered(np.array([2, 3, 4, 9]), 6) == 4 and nearest_answered(np.array([2, 6, 9]), 6) == 9
    assert nearest_answered(np.array([6]), 6) is None and nearest_answered(np.array([2]), 6, within=3) is None
    assert nearest_answered(np.array([40]), 6) == 40
    stack = np.zeros((8, 4, 4), bool)
    stack[2, 1, 1] = stack[5, 2, 2] = True
    assert nearest_answer(stack, 4)[2, 2] and nearest_answer(stack, 1)[1, 1] and nearest_answer(stack, 5)[1, 1]
    assert nearest_answer(stack[:3], 2) is None
    nearby = np.zeros((100, 100), bool)
    nearby[30:70, 30:70] = True  # equivalent radius 22.6 px: half of it is 11.3 px
    everything = np.ones_like(nearby)
    kept = within_nearby(everything, nearby, reach=0.5)
    assert kept[50, 19] and not kept[50, 18] and kept[30, 30] and not kept[5, 5]
    small = np.zeros_like(nearby)
    small[50, 50] = True
    assert within_nearby(everything, small)[50, 53] and not within_nearby(everything, small)[50, 55]  # 3 px
    assert np.array_equal(within_nearby(everything, None), everything)
    assert np.array_equal(within_nearby(everything, np.zeros_like(nearby)), everything)


def test_a_click_past_the_extent_is_kept_near_the_segmented_slices(blob_session, monkeypatch):
    """A corrective re-run (``segment_from_prompts`` with ``previous``) of a slice without an answer keeps
    SAM's answer to its click within the nearest answered slice's answer, grown; ``click_nearby`` off keeps
    all of it (what MobileSAM does with a point alone: far more than the organ)."""
    session, blob = blob_session
    everything = np.ones((64, 64), bool)
    monkeypatch.setattr(session, "decode_slice", lambda axis, index, prompts: (everything, 0.9))
    previous = np.zeros_like(blob)
    previous[3:6] = blob[3:6]  # slices 3-5 answered, slice 7 past the extent (slice 6 empty too)
    example = np.zeros_like(blob)
    example[4] = blob[4]
    edit = {7: {"fg": np.array([[7, 32, 32]], float), "bg": np.zeros((0, 3)), "box": None}}
    out = session.segment_from_prompts(example, 0, edit, previous=previous).mask[7]
    assert out[32, 32] and out.sum() < 2 * previous[5].sum() and not out[0, 0]
    monkeypatch.setattr(session, "click_nearby", False)
    assert session.segment_from_prompts(example, 0, edit, previous=previous).mask[7].all()


def test_the_session_corrects_with_the_click_spread(blob_session):
    """A session's corrective re-run (``corrected_slice``, what a point added in Slicer and ``--previous``
    use) applies ``CLICK_SPREAD``; ``click_spread = None`` takes the whole region."""
    from FewShotSAMLib.corrections import CLICK_SPREAD

    session, _ = blob_session
    prev = np.zeros((60, 60), bool)
    prev[20:40, 10:20] = True
    new = prev.copy()
    new[20:40, 20:58] = True
    click = np.array([[7, 30, 22]])  # voxel (slice 7, row 30, column 22): 3 px outside the answer
    assert session.click_spread == CLICK_SPREAD == 3.0
    near = session.corrected_slice(0, prev, new, click, np.zeros((0, 3)))
    assert near[30, 30] and not near[30, 50]
    session.click_spread = None
    try:
        assert session.corrected_slice(0, prev, new, click, np.zeros((0, 3)))[30, 50]
    finally:
        del session.click_spread  # the module's shared session keeps the class default


def test_previous_answer_reaches_only_a_decoder_that_reads_it(blob_session):
    """The box-trained LiteMedSAM gets no mask input; a backend that reads previous answers gets its
    own form of the slice's previous answer, only for prompts with points."""
    from FewShotSAMLib.prompts.base import Prompts

    session, blob = blob_session
    with_point = Prompts(fg_points=np.array([[30.0, 30.0]]), box=np.array([10, 10, 50, 50]))
    box_only = Prompts(box=np.array([10, 10, 50, 50]))
    out = session.with_previous_answer(0, [with_point, box_only], blob[4])
    assert all(p.mask_input is None for p in out)
    backend = session.backend
    backend.previous_answer_input = lambda m: np.where(m, 7.0, -7.0).astype(np.float32)  # instance attribute
    try:
        one = session.with_previous_answer(0, [with_point], blob[4])[0]
        assert one.mask_input is not None and one.mask_input.max() == 7.0
        assert (one.mask_input > 0).sum() == session.prepared(0).mask_to_model(blob[4]).sum()
        assert session.with_previous_answer(0, [box_only], blob[4])[0].mask_input is None
        assert with_point.mask_input is None  # the caller's prompts are not modified
    finally:
        del backend.previous_answer_input


def test_2d_or_4d_image_is_rejected(litemedsam):
    with pytest.raises(UserInputError, match="3D"):
        VolumeSession(np.zeros((10, 10), np.float32), (1, 1), sam=litemedsam)


@pytest.fixture(scope="module")
def chaos1(litemedsam):
    require(CHAOS_DIR)
    img = read_volume(CHAOS_DIR / "image_1.nii.gz")
    lab = read_volume(CHAOS_DIR / "label_1.nii.gz").array
    from FewShotSAMLib.sam.cache import EmbeddingCache

    cache = EmbeddingCache(litemedsam, persist_dir=SHARED_EMBEDDINGS)
    return VolumeSession(img.array, img.spacing, sam=litemedsam, cache=cache), lab


@pytest.mark.parametrize("label,floor", [(1, LIVER_FLOOR), (2, KIDNEY_FLOOR)])
def test_chaos_middle_slice_auto_extent(chaos1, label, floor):
    session, lab = chaos1
    gt = lab == label
    zs = painted_slices(gt, 0)
    ex = np.zeros_like(gt)
    ex[zs[len(zs) // 2]] = gt[zs[len(zs) // 2]]
    res = session.segment(ex)
    assert dice(res.mask, gt) >= floor


def test_release_embeddings_frees_the_cache_and_changes_nothing(litemedsam):
    """``segment(..., release_embeddings=True)`` (what the segment command asks for) gives the same result
    and leaves no embedding in memory; a later run on the session encodes again or reads spilled files."""
    image, blob = blob_volume()
    ex = np.zeros_like(blob)
    ex[4] = blob[4]
    kept = VolumeSession(image, (3.0, 1.0, 1.0), sam=litemedsam)
    released = VolumeSession(image, (3.0, 1.0, 1.0), sam=litemedsam)
    a = kept.segment(ex, generator="boxprop")
    b = released.segment(ex, generator="boxprop", release_embeddings=True)
    assert np.array_equal(a.mask, b.mask)
    assert kept.cache.memory_bytes > 0 and released.cache.memory_bytes == 0
    encoded = released.cache.encoded
    c = released.segment(ex, generator="boxprop")
    assert np.array_equal(c.mask, a.mask) and released.cache.encoded > encoded

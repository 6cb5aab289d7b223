"""Unit tests of the shared feature helpers and the four matching generators on small synthetic
embeddings. The SAM backend is a small stand-in (``BoxBackend``) whose decode returns the prompted box
(or a disc around the positive points): the generators are what is tested here, not SAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from FewShotSAMLib.prompts import make_generator
from FewShotSAMLib.prompts import features as F
from FewShotSAMLib.prompts.base import Prompts, QueryContext, Support
from FewShotSAMLib.sam.backend import DecodeResult

S, G, C = 64, 16, 8  # model frame, embedding grid, channels (4 model pixels per grid cell)


class BoxBackend:
    """Stand-in backend: the mask is the box (else discs of radius 6 around the positive points)."""

    name = "box-standin"
    input_size = S
    prefers_box = True

    def __init__(self) -> None:
        self.calls: list[Prompts] = []

    def decode(self, embedding, prompts: Prompts, multimask: bool = False) -> DecodeResult:
        self.calls.append(prompts)
        m = np.zeros((S, S), bool)
        if prompts.box is not None:
            r0, c0, r1, c1 = np.round(prompts.box).astype(int)
            m[r0:r1 + 1, c0:c1 + 1] = True
        else:
            rr, cc = np.mgrid[:S, :S]
            for r, c in prompts.fg_points:
                m |= (rr - r) ** 2 + (cc - c) ** 2 <= 36
        logits = np.where(m, 5.0, -5.0).astype(np.float32)
        low = torch.nn.functional.interpolate(torch.from_numpy(logits)[None, None], size=(256, 256))[0, 0].numpy()
        return DecodeResult(logits, 0.9, low)


def make_embedding(target_cells: list[tuple[slice, slice]], seed: int, parts: int = 1) -> torch.Tensor:
    """(C, G, G) features: background direction e0, target direction e1 (+ a part direction per third of
    the target's columns when parts > 1), small noise."""
    rng = np.random.default_rng(seed)
    e = np.zeros((C, G, G), np.float32)
    e[0] = 1.0
    for rs, cs in target_cells:
        e[0, rs, cs] = 0.1
        e[1, rs, cs] = 1.0
        if parts > 1:
            cols = np.arange(G)[cs]
            for k, chunk in enumerate(np.array_split(cols, parts)):
                e[2 + k, rs, chunk] = 0.8
    e += 0.05 * rng.standard_normal(e.shape).astype(np.float32)
    return torch.from_numpy(e)


def cells_to_mask(rs: slice, cs: slice) -> np.ndarray:
    m = np.zeros((S, S), bool)
    m[rs.start * 4:rs.stop * 4, cs.start * 4:cs.stop * 4] = True
    return m


SUP_CELLS = (slice(3, 8), slice(3, 9))
QRY_CELLS = (slice(8, 13), slice(7, 13))  # the target moved on the query


@pytest.fixture()
def case():
    sup = Support(make_embedding([SUP_CELLS], 0), cells_to_mask(*SUP_CELLS), 0)
    query = make_embedding([QRY_CELLS], 1)
    ctx = QueryContext(None, np.ones((S, S), bool), 5, 0)
    return sup, query, ctx, cells_to_mask(*QRY_CELLS)


# ---- features ------------------------------------------------------------------------------------
def test_mask_to_grid_is_area_fraction():
    m = np.zeros((S, S), bool)
    m[0:2, 0:4] = True  # half of cell (0, 0)
    g = F.mask_to_grid(m, (G, G))
    assert g.shape == (G, G) and g[0, 0] == pytest.approx(0.5) and g.sum() == pytest.approx(0.5)


def test_grid_points_are_cell_centres():
    pts = F.grid_to_model_points(np.array([[0, 0], [15, 2]]), (G, G), S)
    np.testing.assert_allclose(pts, [[1.5, 1.5], [61.5, 9.5]])


def test_prototype_similarity_peaks_on_target(case):
    sup, query, ctx, truth = case
    proto = F.masked_prototype(sup.embedding, F.mask_to_grid(sup.mask, (G, G)))
    sim = F.cosine_similarity(query, proto)
    assert sim.shape == (G, G)
    assert sim[QRY_CELLS].min() > sim[~F.mask_to_grid(truth, (G, G)).astype(bool)].max()
    assert F.cosine_similarity(query, np.stack([proto, proto])).shape == (2, G, G)


def test_kmeans_pp_separates_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(5, 0.1, (30, 2)), rng.normal([0, 9], 0.1, (20, 2))])
    c1, l1 = F.kmeans_pp(x, 3, seed=3)
    c2, l2 = F.kmeans_pp(x, 3, seed=3)
    np.testing.assert_array_equal(l1, l2)
    assert sorted(np.bincount(l1).tolist()) == [20, 30, 50]
    assert len(F.kmeans_pp(np.ones((4, 2)), 3)[0]) == 1  # k capped at distinct rows


def test_spread_points_respects_distance_and_candidates():
    score = np.zeros((10, 10))
    score[2, 2], score[2, 3], score[7, 7] = 3, 2.9, 1
    pts = F.spread_points(score, 2, min_distance=3)
    np.testing.assert_array_equal(pts, [[2, 2], [7, 7]])
    cand = np.zeros((10, 10), bool)
    cand[5:, 5:] = True
    np.testing.assert_array_equal(F.spread_points(score, 1, 1, candidates=cand), [[7, 7]])


def test_ring_is_outside_band():
    m = np.zeros((20, 20), bool)
    m[8:12, 8:12] = True
    r = F.ring(m, 1, 3)
    assert not (r & m).any() and not r[7, 8] and r[5, 8] and not r[4, 8]


def test_presence_and_wasserstein(case):
    sup, query, ctx, truth = case
    summ = F.summarise_support(sup.embedding, sup.mask, ctx.valid)
    sim = F.cosine_similarity(query, summ.prototype)
    inside = F.mask_to_grid(truth, (G, G))
    assert F.presence_score(summ.levels, sim, inside) > 0.9
    assert F.presence_score(summ.levels, sim, 1 - inside) < 0.1
    assert F.presence_score(summ.levels, sim, np.zeros((G, G))) == 0.0
    units = F.unit_features(query)
    same = F.wasserstein(summ.fg_features, units[inside.reshape(-1) >= 0.5])
    other = F.wasserstein(summ.fg_features, units[inside.reshape(-1) == 0])
    assert same < other


def test_region_and_best_component():
    sim = np.zeros((S, S))
    sim[5:10, 5:10] = 1.0
    sim[30:50, 30:50] = 0.8
    assert F.region_around(sim, 0.5, np.array([7, 7]))[7, 7]
    assert F.region_around(sim, 0.5, np.array([7, 7])).sum() == 25
    assert F.region_around(sim, 0.5, None).sum() == 400  # largest mass without a seed
    mask = sim > 0
    assert F.best_component(mask, sim).sum() == 25  # highest mean score


# ---- generators ----------------------------------------------------------------------------------
def test_persam_points_box_presence(case):
    sup, query, ctx, truth = case
    be = BoxBackend()
    p = make_generator("persam").generate(sup, query, ctx, be)
    assert len(be.calls) == 2  # two internal passes, the third is the caller's
    r, c = np.round(p.fg_points[0]).astype(int)
    assert truth[r, c], "positive point must land on the region most similar to the prototype"
    r, c = np.round(p.bg_points[0]).astype(int)
    assert not truth[r, c]
    assert p.box is not None and p.mask_input is not None and p.mask_input.shape == (256, 256)
    box_mask = be.decode(query, Prompts(box=p.box)).mask
    assert (box_mask & truth).sum() / (box_mask | truth).sum() > 0.8
    assert p.presence > 0.9
    absent = make_embedding([], 2)
    assert make_generator("persam").generate(sup, absent, ctx, BoxBackend()).presence < 0.5


def test_p2sam_gives_n_parts_and_retrieves(case):
    sup = Support(make_embedding([SUP_CELLS], 0, parts=3), cells_to_mask(*SUP_CELLS), 0)
    query = make_embedding([QRY_CELLS], 1, parts=3)
    _, _, ctx, truth = case
    gen = make_generator("p2sam")
    summ = F.summarise_support(sup.embedding, sup.mask, ctx.valid)
    valid_grid = np.ones((G, G), bool)
    for n in (1, 2, 3):
        pos, neg = gen.points(summ, query, n, valid_grid, S)
        assert len(pos) == n
        assert all(truth[int(round(r)), int(round(c))] for r, c in pos)
        assert not any(truth[int(round(r)), int(round(c))] for r, c in neg)
    be = BoxBackend()
    p = gen.generate(sup, query, ctx, be)
    assert len(be.calls) == len(gen.parts) + 1 and p.box is not None and p.presence > 0.9


def test_synpo_negatives_from_confidence_band(case):
    sup, query, ctx, truth = case
    gen = make_generator("synpo")
    summ = F.summarise_support(sup.embedding, sup.mask, ctx.valid)
    conf = gen.confidence(summ, query)
    lo, hi = gen.negative_band(summ, sup.embedding)
    s_bg = gen.confidence(summ, sup.embedding)[summ.bg_cells]
    assert lo == pytest.approx(s_bg.mean()) and hi == pytest.approx(s_bg.mean() + 1.5 * s_bg.std())
    cand = gen.negative_candidates(conf, lo, hi, np.ones((G, G), bool))
    assert len(cand) > 0
    vals = conf[cand[:, 0].astype(int), cand[:, 1].astype(int)]
    assert (vals >= lo).all() and (vals <= hi).all()
    assert vals.min() > conf.min()  # "less, not least, similar"
    pos, neg = gen.points(summ, sup.embedding, conf, np.ones((G, G), bool), S)
    assert len(pos) == gen.k_pos and all(truth[int(round(r)), int(round(c))] for r, c in pos)
    assert 0 < len(neg) <= gen.k_neg
    p = gen.generate(sup, query, ctx, BoxBackend())
    assert p.box is not None and p.presence > 0.9


def test_coarse_gives_one_box_per_component():
    sim = np.zeros((S, S), np.float32)
    sim[4:20, 4:20] = 1.0
    sim[40:60, 30:62] = 0.9
    comps = make_generator("coarse").component_prompts(sim, 0.5)
    assert len(comps) == 2
    for prompts, comp, _ in comps:
        r0, c0, r1, c1 = prompts.box
        rows, cols = np.nonzero(comp)
        assert (r0, c0, r1, c1) == (rows.min(), cols.min(), rows.max(), cols.max())
        assert all(comp[int(round(r)), int(round(c))] for r, c in prompts.fg_points)
    assert comps[0][1][50, 40]  # largest similarity mass first


def test_coarse_generate_and_absent(case):
    sup, query, ctx, truth = case
    p = make_generator("coarse").generate(sup, query, ctx, BoxBackend())
    m = BoxBackend().decode(query, Prompts(box=p.box)).mask
    assert (m & truth).sum() / (m | truth).sum() > 0.8 and p.presence > 0.9
    absent = make_generator("coarse").generate(sup, make_embedding([], 2), ctx, BoxBackend())
    assert absent.presence < 0.5


@pytest.mark.parametrize("name", ["persam", "p2sam", "synpo", "coarse"])
def test_generators_are_deterministic(case, name):
    sup, query, ctx, _ = case
    a = make_generator(name).generate(sup, query, ctx, BoxBackend())
    b = make_generator(name).generate(sup, query, ctx, BoxBackend())
    np.testing.assert_array_equal(a.fg_points, b.fg_points)
    np.testing.assert_array_equal(a.bg_points, b.bg_points)
    np.testing.assert_array_equal(a.box, b.box)
    assert a.presence == b.presence


def test_box_propagation_grows_the_box_only_where_the_backend_allows_it(case):
    """The neighbour's box may grow for a backend measured to gain from it (``grows_box``: LiteMedSAM), not
    for the others (MobileSAM loses with it); the support's box on a slice without a neighbour never grows."""
    from dataclasses import replace

    from FewShotSAMLib.prompts.boxprop import BOX_GROWTH, BOX_MARGIN, BoxPropagation
    from FewShotSAMLib.sam.litemedsam import LiteMedSAMBackend
    from FewShotSAMLib.shape import mask_box
    from FewShotSAMLib.sam.segment_anything_vit import SegmentAnythingBackend

    sup, query, ctx, truth = case
    follows = replace(ctx, neighbour_mask=truth)
    backend = BoxBackend()
    assert BoxPropagation().generate(sup, query, follows, backend).box_growth == 0.0
    backend.grows_box = True
    grown = BoxPropagation().generate(sup, query, follows, backend)
    assert grown.box_growth == BOX_GROWTH * S / 256
    assert np.array_equal(grown.box, mask_box(truth, BOX_MARGIN * S / 256))  # the neighbour's box either way
    assert BoxPropagation().generate(sup, query, ctx, backend).box_growth == 0.0  # no neighbour: fixed
    assert LiteMedSAMBackend.grows_box and not SegmentAnythingBackend.grows_box

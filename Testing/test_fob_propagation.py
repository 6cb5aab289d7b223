"""FoB inside the propagation (mode ``propagate``): the neighbour's box, and a presence from FoB's correlation
map that says where the target ends. Toy weights for the definitions; the shipped weights on a real CHAOS
volume for the effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import CHAOS_DIR, SHARED_EMBEDDINGS, require
from FewShotSAMLib.prompt_types import QueryContext, Support
from FewShotSAMLib.prompts.boxprop import BoxPropagation
from FewShotSAMLib.prompts.fob import FoBGenerator
from test_fob import _disc, _FakeBackend, _save_small


@pytest.fixture()
def toy(tmp_path):
    path = _save_small(tmp_path / "fob.pt")
    gen = FoBGenerator(weights=path)
    cfg = gen.cfg
    g = torch.Generator().manual_seed(1)
    support = Support(torch.randn(cfg.in_channels, cfg.grid, cfg.grid, generator=g), _disc(64, (30, 28), 10))
    query = torch.randn(cfg.in_channels, cfg.grid, cfg.grid, generator=g)
    neighbour = _disc(64, (32, 30), 9)
    return path, support, query, neighbour


def test_propagate_gives_the_neighbours_box_and_no_points(toy):
    path, support, query, neighbour = toy
    ctx = QueryContext(neighbour, np.ones((64, 64), bool))
    gen = FoBGenerator(weights=path, min_corr=0.0)
    assert gen.prompt_mode(_FakeBackend(), ctx) == "propagate"
    assert gen.prompt_mode(_FakeBackend(), QueryContext(None, ctx.valid)) != "propagate"
    p = gen.generate(support, query, ctx, _FakeBackend())
    expected = BoxPropagation().generate(support, query, ctx, _FakeBackend())
    np.testing.assert_allclose(p.box, expected.box)
    assert p.box_growth == expected.box_growth > 0  # the engine may widen it as it widens box propagation's
    assert len(p.fg_points) == 0 and len(p.bg_points) == 0


def test_weights_without_a_propagation_threshold_keep_their_own_mode_inside_a_propagation(toy):
    """Uncalibrated, ``propagate`` could never end the target (presence 1): FoB's own prompts and presence
    model are used instead (the shipped MobileSAM weights)."""
    path, support, query, neighbour = toy
    ctx = QueryContext(neighbour, np.ones((64, 64), bool))
    gen = FoBGenerator(weights=path)
    assert gen.min_corr is None and gen.prompt_mode(_FakeBackend(), ctx) == "box"  # _FakeBackend prefers a box
    p = gen.generate(support, query, ctx, _FakeBackend())
    assert p.presence is not None and p.presence < 1.0
    assert FoBGenerator(weights=path, mode="propagate").prompt_mode(_FakeBackend(), ctx) == "propagate"


def test_propagation_presence_crosses_one_half_at_the_calibrated_correlation(toy):
    path, support, query, neighbour = toy
    gen = FoBGenerator(weights=path)
    assert gen.min_corr is None and gen.propagation_presence(support, query, neighbour) == 1.0  # not calibrated
    core = ndimage.binary_erosion(neighbour, iterations=1)
    c = float(gen.correlation(support, query)[core].mean())
    assert 0.0 < c < 1.0
    above = FoBGenerator(weights=path, min_corr=c - 0.005).propagation_presence(support, query, neighbour)
    below = FoBGenerator(weights=path, min_corr=c + 0.005).propagation_presence(support, query, neighbour)
    assert above > 0.6 and below < 0.4


def test_correlation_follows_the_support(toy):
    """The prototype kept between queries belongs to the support asked about, not the previous one."""
    path, support, query, _ = toy
    gen = FoBGenerator(weights=path)
    first = gen.correlation(support, query)
    other = Support(support.embedding, _disc(64, (12, 50), 6))
    second = gen.correlation(other, query)
    assert not np.allclose(first, second)
    np.testing.assert_allclose(gen.correlation(support, query), first)
    assert first.shape == (64, 64) and first.min() >= 0.0 and first.max() <= 1.0


# ---- the shipped weights on a real volume -----------------------------------------------------------
@pytest.fixture(scope="module")
def points_store():
    require(CHAOS_DIR / "image_1.nii.gz")
    from FewShotSAMLib.sam import load_backend
    from FewShotSAMLib.sam.cache import EmbeddingCache
    from fewshotsam_lab import evaluate as E

    backend = load_backend("litemedsam-points", "cpu")
    cache = EmbeddingCache(backend, persist_dir=SHARED_EMBEDDINGS)
    return E.CaseStore([c for c in E.list_cases(CHAOS_DIR) if c[0] == 1], backend, cache)


def test_fob_stops_the_propagation_where_box_propagation_overruns(points_store):
    """Volume 1's liver and spleen: box propagation segments slices past the organ's ends (7; the liver 6);
    FoB stops nearer them (1) and scores higher (93.0 against 91.2, the liver 90.2 against 86.5)."""
    from fewshotsam_lab import evaluate as E

    gen = FoBGenerator()
    if gen.min_corr is None:
        pytest.fail("the shipped FoB weights have no propagation calibration (calibrate-fob-extent --write)")
    case = points_store.get(1)
    box, fob = [], []
    for organ in (1, 4):
        box.append(E.product_volume(points_store, BoxPropagation(), case, organ))
        fob.append(E.product_volume(points_store, gen, case, organ))
    assert sum(r["outside"] for r in fob) < sum(r["outside"] for r in box)
    assert np.mean([r["dice"] for r in fob]) > np.mean([r["dice"] for r in box])

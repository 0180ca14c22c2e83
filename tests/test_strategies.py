"""Tests of the built-in strategies (tome, retom, random) against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tokenmerge
from tokenmerge.plan import Plan
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site, TokenLayout
from tokenmerge.strategies.retom import representatives
from tokenmerge.testing import STRATEGY_CHECKS, check_plan
from tokenmerge.windows import window_partition

FAST = settings(max_examples=60, deadline=None)
TOL = 1e-5
SITE = Site("blocks.0")

grids = st.tuples(st.integers(1, 9), st.integers(1, 9))
batches = st.sampled_from([1, 3, 4])  # one, odd, even (classifier-free guidance doubled)
seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------------------- helpers


def features_for(batch: int, n: int, seed: int, channels: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, n, channels, generator=gen), dim=-1)


def gen(seed: int = 0) -> SiteRandom:
    return SiteRandom(seed)


def plan_features(strategy, features: torch.Tensor) -> torch.Tensor:
    """What the framework hands a strategy: content-blind ones get ``(1, n, 0)``."""
    if strategy.uses_features:
        return features
    return features.new_empty(1, features.shape[1], 0)


def window_id(grid, size) -> list[int]:
    """Window of every token, windows cut by the grid's edge included (computed by hand)."""
    h, w = grid
    sy, sx = size
    per_row = math.ceil(w / sx)
    return [(i // sy) * per_row + j // sx for i in range(h) for j in range(w)]


def whole_cell_id(grid, size) -> list[int | None]:
    """ToMe's cell of every token: None on the leftover rows / columns (cells clamped to grid)."""
    h, w = grid
    sy, sx = min(size[0], h), min(size[1], w)
    rows, cols = h // sy, w // sx
    return [
        (i // sy) * cols + j // sx if i < rows * sy and j < cols * sx else None
        for i in range(h)
        for j in range(w)
    ]


def dst_tokens(plan: Plan) -> torch.Tensor:
    """``(P, r)`` token index of each source's destination."""
    return plan.kept.gather(1, plan.dst)


def brute_mean_similarity(features: torch.Tensor, ids: list[int]) -> list[dict[int, float]]:
    """Per row: token -> mean cosine similarity to the other tokens of its window (O(K^2))."""
    out = []
    for f in features.double():
        sim = f @ f.T
        row = {}
        for window in set(ids):
            members = [t for t, i in enumerate(ids) if i == window]
            for t in members:
                others = [u for u in members if u != t]
                row[t] = sum(sim[t, u].item() for u in others) / len(others) if others else 0.0
        out.append(row)
    return out


def assert_is_representative(row_means: dict[int, float], ids: list[int], token: int) -> None:
    members = [t for t, i in enumerate(ids) if i == ids[token]]
    best = max(row_means[t] for t in members)
    assert row_means[token] >= best - TOL, (token, row_means[token], best)


@st.composite
def configs(draw, names=("tome", "retom", "random")):
    """``(name, options, site)`` for a valid strategy config (ratio not included)."""
    name = draw(st.sampled_from(names))
    site = SITE
    if name == "retom":
        options = {"scope": draw(st.sampled_from(["window", "global"]))}
        if draw(st.booleans()):
            options["window_size"] = draw(st.integers(2, 4))
        else:  # the per-stage default: 4 in the bottleneck, 2 elsewhere
            site = Site("mid_block", stage=draw(st.sampled_from(["down", "mid", "up", None])))
    elif name == "tome":
        options = {
            "sy": draw(st.integers(1, 3)),
            "sx": draw(st.integers(1, 3)),
            "random_destinations": draw(st.booleans()),
            "partition": draw(st.sampled_from(["cells", "alternate", "auto"])),
        }
        if options["partition"] != "alternate" and options["sx"] * options["sy"] < 2:
            options["sx"] = 2
        if options["partition"] == "auto":
            site = Site("blocks.0", mode=draw(st.sampled_from(["local", "progressive"])))
    else:
        options = {"sy": draw(st.integers(1, 3)), "sx": draw(st.integers(1, 3))}
        if options["sx"] * options["sy"] < 2:
            options["sy"] = 2
    return name, options, site


def strategy_with_ratio(data, name, options):
    limit = tokenmerge.load_config(name, **options).ratio_limit()
    ratio = data.draw(st.floats(0.0, limit, exclude_max=True), label="ratio")
    return tokenmerge.get_strategy(name, ratio=ratio, **options), ratio


# ---------------------------------------------------------------------------- every strategy


@settings(max_examples=120, deadline=None)
@given(config=configs(), grid=grids, batch=batches, seed=seeds, data=st.data())
def test_plan_size_and_indices(config, grid, batch, seed, data):
    name, options, site = config
    strategy, ratio = strategy_with_ratio(data, name, options)
    layout = TokenLayout(grid)
    n = grid[0] * grid[1]
    capacity = strategy.capacity(layout, site)
    num_merge = min(math.floor(ratio * n), capacity)
    features = features_for(batch, n, seed)
    plan = strategy.make_plan(plan_features(strategy, features), layout, site, num_merge, gen(seed))
    check_plan(plan, n, batch, n - num_merge)
    x = torch.randn(batch, n, 3)
    merged = plan.merge(x)
    assert merged.shape == (batch, n - num_merge, 3)
    assert plan.unmerge(merged).shape == x.shape


# The conformance kit's checks (ratio 0 is the identity, plans well-formed, capacity honoured,
# determinism, no global RNG, batch / CFG rows...) on non-default options; tests/test_conformance.py
# runs them on every strategy's defaults.
OPTION_VARIANTS = [
    ("tome", {"random_destinations": False}),
    ("tome", {"partition": "alternate"}),
    ("tome", {"partition": "cells", "sx": 3, "sy": 1}),
    ("retom", {"scope": "global"}),
    ("retom", {"window_size": 3}),
    ("random", {"sx": 1, "sy": 3}),
]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("check", STRATEGY_CHECKS)
@pytest.mark.parametrize(
    "name, options",
    OPTION_VARIANTS,
    ids=[f"{name}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for name, o in OPTION_VARIANTS],
)
def test_conformance_with_options(name, options, check):
    STRATEGY_CHECKS[check](tokenmerge.registry.registry.strategy(name), options)


@pytest.mark.parametrize("name, options", [("tome", {}), ("random", {})])
def test_different_seed_different_plan(name, options):
    strategy = tokenmerge.get_strategy(name, ratio=0.5, **options)
    layout = TokenLayout((16, 16))
    features = plan_features(strategy, features_for(1, 256, 3))
    plans = [strategy.make_plan(features, layout, SITE, 128, gen(seed)) for seed in (1, 2)]
    assert not torch.equal(plans[0].kept, plans[1].kept)


def test_tome_without_random_destinations_ignores_the_seed():
    strategy = tokenmerge.get_strategy("tome", ratio=0.5, random_destinations=False)
    layout = TokenLayout((8, 8))
    features = features_for(2, 64, 4)
    plans = [strategy.make_plan(features, layout, SITE, 32, gen(seed)) for seed in (1, 2)]
    assert torch.equal(plans[0].origin, plans[1].origin)


@pytest.mark.parametrize(
    "name, options",
    [
        ("tome", {}),
        ("tome", {"partition": "alternate"}),
        ("retom", {}),
        ("retom", {"scope": "global"}),
    ],
)
def test_cfg_doubled_batch_gives_equal_halves(name, options):
    strategy = tokenmerge.get_strategy(name, ratio=0.5, **options)
    layout = TokenLayout((6, 6))
    half = features_for(2, 36, 5)
    plan = strategy.make_plan(torch.cat([half, half]), layout, SITE, 18, gen(3))
    assert plan.batch == 4
    assert torch.equal(plan.origin[:2], plan.origin[2:])
    assert torch.equal(plan.kept[:2], plan.kept[2:])


@pytest.mark.parametrize(
    "name, options",
    [
        ("tome", {}),
        ("tome", {"partition": "alternate"}),
        ("retom", {}),
        ("retom", {"scope": "global"}),
    ],
)
def test_per_sample_plans_follow_each_sample(name, options):
    strategy = tokenmerge.get_strategy(name, ratio=0.5, **options)
    layout = TokenLayout((6, 6))
    features = features_for(3, 36, 6)
    plan = strategy.make_plan(features, layout, SITE, 18, gen(3))
    assert plan.batch == 3
    assert not torch.equal(plan.origin[0], plan.origin[1])
    for b in range(3):
        alone = strategy.make_plan(features[b : b + 1], layout, SITE, 18, gen(3))
        assert torch.equal(plan.origin[b], alone.origin[0])
        assert torch.equal(plan.kept[b], alone.kept[0])


# ---------------------------------------------------------------------------- capacity


@FAST
@given(config=configs(), grid=grids, seed=seeds)
@example(config=("tome", {"partition": "alternate"}, SITE), grid=(1, 1), seed=0)
@example(config=("tome", {"partition": "alternate"}, SITE), grid=(1, 3), seed=0)
def test_capacity_by_hand_and_merging_it_exactly_works(config, grid, seed):
    name, options, site = config
    strategy = tokenmerge.get_strategy(name, ratio=0.0, **options)
    h, w = grid
    n = h * w
    layout = TokenLayout(grid)
    capacity = strategy.capacity(layout, site)
    cfg = strategy.config
    if name == "retom":
        s = cfg.window_for(site)
        assert capacity == n - math.ceil(h / s) * math.ceil(w / s)
    elif name == "random":
        assert capacity == n - math.ceil(h / cfg.sy) * math.ceil(w / cfg.sx)
    elif cfg.partition == "alternate" or (cfg.partition == "auto" and site.mode != "local"):
        # every even token can merge while there is an odd one to merge into
        assert capacity == n // 2  # ToMe's cap: at most half the tokens merge
    else:
        sy, sx = min(cfg.sy, h), min(cfg.sx, w)
        assert capacity == (n - (h // sy) * (w // sx) if sy * sx > 1 else 0)
    features = plan_features(strategy, features_for(2, n, seed))
    plan = strategy.make_plan(features, layout, site, capacity, gen(seed))
    check_plan(plan, n, 2, n - capacity)


def test_retom_window_size_follows_the_stage():
    strategy = tokenmerge.get_strategy("retom", ratio=0.5)
    layout = TokenLayout((8, 8))
    assert strategy.capacity(layout, Site("mid", stage="mid")) == 64 - 1  # one 8 x 8 window
    assert strategy.capacity(layout, Site("down", stage="down")) == 64 - 4  # 6 x 6, cut at 8
    assert strategy.capacity(layout, Site("up", stage="up")) == 64 - 4
    assert strategy.capacity(TokenLayout((7, 5)), Site("x")) == 35 - 2 * 2  # 4 x 4, cut


# ---------------------------------------------------------------------------- retom


@FAST
@given(grid=grids, size=st.integers(2, 4), batch=batches, seed=seeds, channels=st.integers(2, 6))
def test_retom_representatives_are_the_brute_force_argmax(grid, size, batch, seed, channels):
    n = grid[0] * grid[1]
    features = features_for(batch, n, seed, channels)
    windows = window_partition(grid, (size, size))
    rep_slot, to_rep = representatives(features, windows)
    ids = window_id(grid, (size, size))
    means = brute_mean_similarity(features, ids)
    assert rep_slot.shape == (batch, windows.shape[0])
    assert to_rep.shape == (batch, *windows.shape)
    f64 = features.double()
    for p in range(batch):
        for wi, members in enumerate(windows.tolist()):
            rep = members[rep_slot[p, wi]]
            assert rep >= 0, "the representative is a padding place"
            assert ids[rep] == wi
            assert_is_representative(means[p], ids, rep)
            for k, token in enumerate(members):
                value = to_rep[p, wi, k].item()
                if token < 0 or token == rep:
                    assert value == float("-inf")
                else:
                    expected = (f64[p, token] @ f64[p, rep]).item()
                    assert value == pytest.approx(expected, abs=TOL)


def _retom_case(scope, grid, size, batch, seed, data, destinations="representatives"):
    """A retom plan at a drawn ``num_merge`` and the brute-force facts to check it against
    (None when nothing merged)."""
    n = grid[0] * grid[1]
    strategy = tokenmerge.get_strategy(
        "retom", ratio=0.0, window_size=size, scope=scope, destinations=destinations
    )
    layout = TokenLayout(grid)
    capacity = strategy.capacity(layout, SITE)
    num_merge = data.draw(st.integers(0, capacity), label="num_merge")
    features = features_for(batch, n, seed, 3)
    plan = strategy.make_plan(features, layout, SITE, num_merge, gen(seed))
    check_plan(plan, n, batch, n - num_merge)
    if num_merge == 0:
        return None
    ids = window_id(grid, (size, size))
    means = brute_mean_similarity(features, ids)
    windows = window_partition(grid, (size, size))
    rep_slot, _ = representatives(features, windows)
    return n, plan, num_merge, capacity, ids, means, windows, rep_slot, features.double()


@FAST
@given(grid=grids, size=st.integers(2, 4), batch=batches, seed=seeds, data=st.data())
def test_retom_window_scope_merges_into_own_representative(grid, size, batch, seed, data):
    case = _retom_case("window", grid, size, batch, seed, data)
    if case is None:
        return
    n, plan, num_merge, capacity, ids, means, windows, rep_slot, f64 = case
    for p in range(batch):
        rep_of = {w: windows[w, rep_slot[p, w]].item() for w in range(windows.shape[0])}
        sources = plan.src[p].tolist()
        for s, d in zip(sources, dst_tokens(plan)[p].tolist(), strict=True):
            assert ids[s] == ids[d], "a source left its window"
            assert_is_representative(means[p], ids, d)
            assert d == rep_of[ids[d]]

        # the chosen sources are the non-representatives most similar to their representative
        def score(t, p=p, rep_of=rep_of):
            return (f64[p, t] @ f64[p, rep_of[ids[t]]]).item()

        reps = set(rep_of.values())
        chosen = min(score(t) for t in sources)
        others = [score(t) for t in range(n) if t not in reps and t not in sources]
        if others:
            assert chosen >= max(others) - TOL
        if num_merge == capacity:
            assert set(plan.kept[p].tolist()) == reps


@FAST
@given(grid=grids, size=st.integers(2, 4), batch=batches, seed=seeds, data=st.data())
def test_retom_global_scope_merges_into_most_similar_representative(grid, size, batch, seed, data):
    case = _retom_case("global", grid, size, batch, seed, data)
    if case is None:
        return
    n, plan, num_merge, capacity, ids, means, windows, rep_slot, f64 = case
    for p in range(batch):
        reps = [windows[w, rep_slot[p, w]].item() for w in range(windows.shape[0])]
        for r in reps:
            assert_is_representative(means[p], ids, r)
        sim = f64[p] @ f64[p, reps].T  # (n, windows)
        best = sim.max(dim=1).values
        sources = plan.src[p].tolist()
        for s, d in zip(sources, dst_tokens(plan)[p].tolist(), strict=True):
            assert d in reps
            assert (f64[p, s] @ f64[p, d]).item() >= best[s].item() - TOL
        chosen = min(best[s].item() for s in sources)
        others = [best[t].item() for t in range(n) if t not in reps and t not in sources]
        if others:
            assert chosen >= max(others) - TOL
        if num_merge == capacity:
            assert set(plan.kept[p].tolist()) == set(reps)


@FAST
@given(
    grid=grids,
    size=st.integers(2, 4),
    batch=batches,
    seed=seeds,
    scope=st.sampled_from(["window", "global"]),
    data=st.data(),
)
def test_retom_detail_destinations(grid, size, batch, seed, scope, data):
    """Representatives stay; the sources are the tokens most like a representative (their own
    window's in the window scope, any in the global one); each joins its most similar token
    that stays (within its window in the window scope)."""
    case = _retom_case(scope, grid, size, batch, seed, data, destinations="detail")
    if case is None:
        return
    n, plan, num_merge, capacity, ids, means, windows, rep_slot, f64 = case
    for p in range(batch):
        rep_of = {w: windows[w, rep_slot[p, w]].item() for w in range(windows.shape[0])}
        reps = set(rep_of.values())
        kept = plan.kept[p].tolist()
        assert reps <= set(kept)
        sources = plan.src[p].tolist()

        def likeness(t, p=p, rep_of=rep_of):
            candidates = [rep_of[ids[t]]] if scope == "window" else list(rep_of.values())
            return max((f64[p, t] @ f64[p, r]).item() for r in candidates)

        others = [likeness(t) for t in range(n) if t not in reps and t not in sources]
        if others:
            assert min(likeness(t) for t in sources) >= max(others) - TOL
        for s, d in zip(sources, dst_tokens(plan)[p].tolist(), strict=True):
            reachable = [k for k in kept if scope == "global" or ids[k] == ids[s]]
            assert d in reachable
            best = max((f64[p, s] @ f64[p, k]).item() for k in reachable)
            assert (f64[p, s] @ f64[p, d]).item() >= best - TOL


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
def test_retom_auto_scope_is_window_where_positions_are_rotary_and_global_elsewhere(
    progressive, rotary
):
    grid = (8, 8)
    positions = torch.arange(64).unsqueeze(0) if progressive else None
    layout = TokenLayout(grid, positions=positions)
    site = Site("blocks.0", rotary=rotary)
    features = features_for(2, 64, seed=3)
    auto = tokenmerge.get_strategy("retom", ratio=0.0, window_size=2)
    assert auto.config.scope == "auto"  # the default
    expected = "window" if rotary else "global"
    assert auto.config.scope_at(site) == expected
    explicit = tokenmerge.get_strategy("retom", ratio=0.0, window_size=2, scope=expected)
    other = tokenmerge.get_strategy(
        "retom", ratio=0.0, window_size=2, scope="global" if rotary else "window"
    )
    plans = [s.make_plan(features, layout, site, 24, gen()) for s in (auto, explicit, other)]
    assert torch.equal(plans[0].origin, plans[1].origin)
    assert not torch.equal(plans[0].origin, plans[2].origin)  # the scope did matter here


# ---------------------------------------------------------------------------- tome


@FAST
@given(
    grid=grids,
    cell=st.tuples(st.integers(1, 3), st.integers(1, 3)).filter(lambda c: c[0] * c[1] > 1),
    random_destinations=st.booleans(),
    batch=batches,
    seed=seeds,
    data=st.data(),
)
def test_tome_cells(grid, cell, random_destinations, batch, seed, data):
    h, w = grid
    n = h * w
    sy, sx = cell
    strategy = tokenmerge.get_strategy(
        "tome", ratio=0.0, sy=sy, sx=sx, random_destinations=random_destinations, partition="cells"
    )
    layout = TokenLayout(grid)
    capacity = strategy.capacity(layout, SITE)
    features = features_for(batch, n, seed, 3)
    ids = whole_cell_id(grid, cell)
    num_cells = len({i for i in ids if i is not None})
    # merging everything leaves exactly the destinations: one per whole cell, none elsewhere
    full = strategy.make_plan(features, layout, SITE, capacity, gen(seed))
    check_plan(full, n, batch, n - capacity)
    cy, cx = min(sy, h), min(sx, w)
    for p in range(full.batch):
        destinations = full.kept[p].tolist()
        cells = [ids[t] for t in destinations]
        if cy * cx > 1:
            assert None not in cells, "a leftover row / column token is a destination"
            assert sorted(cells) == list(range(num_cells)), "not one destination per cell"
        if not random_destinations and cy * cx > 1:
            assert all((t // w) % cy == 0 and (t % w) % cx == 0 for t in destinations)
    # a partial merge with the same generator uses the same cells' destinations, best pairs first
    num_merge = data.draw(st.integers(0, capacity), label="num_merge")
    plan = strategy.make_plan(features, layout, SITE, num_merge, gen(seed))
    check_plan(plan, n, batch, n - num_merge)
    if num_merge == 0:
        return
    f64 = features.double()
    for p in range(batch):
        destinations = full.kept[p if full.batch > 1 else 0].tolist()
        assert set(dst_tokens(plan)[p].tolist()) <= set(destinations)
        check_best_pairs(f64[p], destinations, plan.src[p].tolist(), dst_tokens(plan)[p].tolist())


def check_best_pairs(f64, destinations, sources, targets):
    """Bipartite soft matching: every source takes its best destination, best edges first."""
    n = f64.shape[0]
    candidates = [t for t in range(n) if t not in set(destinations)]
    best = {t: max((f64[t] @ f64[d]).item() for d in destinations) for t in candidates}
    for s, d in zip(sources, targets, strict=True):
        assert s in best, "a destination was merged away"
        assert d in destinations
        assert (f64[s] @ f64[d]).item() >= best[s] - TOL
    chosen = min(best[s] for s in sources)
    others = [best[t] for t in candidates if t not in set(sources)]
    if others:
        assert chosen >= max(others) - TOL


@FAST
@given(
    n=st.integers(2, 40),
    batch=batches,
    seed=seeds,
    auto=st.booleans(),
    data=st.data(),
)
def test_tome_alternate_partition(n, batch, seed, auto, data):
    if auto:  # 'auto' picks the alternating partition at progressive sites
        strategy = tokenmerge.get_strategy("tome", ratio=0.0)
        site = Site("blocks.0", mode="progressive")
    else:
        strategy = tokenmerge.get_strategy("tome", ratio=0.0, partition="alternate")
        site = SITE
    layout = TokenLayout((1, n))
    capacity = strategy.capacity(layout, site)
    num_merge = data.draw(st.integers(0, min(capacity, n // 2)), label="num_merge")
    features = features_for(batch, n, seed, 3)
    plan = strategy.make_plan(features, layout, site, num_merge, gen(seed))
    check_plan(plan, n, batch, n - num_merge)
    if num_merge == 0:
        return
    assert bool((plan.src % 2 == 0).all()), "a source at an odd index"
    assert bool((dst_tokens(plan) % 2 == 1).all()), "a destination at an even index"
    odd = list(range(1, n, 2))
    for p in range(batch):
        check_best_pairs(
            features[p].double(), odd, plan.src[p].tolist(), dst_tokens(plan)[p].tolist()
        )


def test_tome_auto_partition_uses_cells_at_local_sites():
    strategy = tokenmerge.get_strategy("tome", ratio=0.5, random_destinations=False)
    layout = TokenLayout((4, 4))
    plan = strategy.make_plan(features_for(1, 16, 0), layout, Site("b", mode="local"), 12, gen())
    assert plan.kept.tolist() == [[0, 2, 8, 10]]


def test_tome_merges_the_most_similar_pair_by_hand():
    # 1 x 4 grid, top-left destinations in 1 x 2 cells: tokens 0 and 2 are destinations
    strategy = tokenmerge.get_strategy(
        "tome", ratio=0.25, sy=1, sx=2, random_destinations=False, partition="cells"
    )
    features = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.1]]]), dim=-1)
    plan = strategy.make_plan(features, TokenLayout((1, 4)), SITE, 1, gen())
    # token 1 matches token 2 exactly; token 3 matches token 0 less well
    assert plan.src.tolist() == [[1]] and dst_tokens(plan).tolist() == [[2]]


# ---------------------------------------------------------------------------- random


@FAST
@given(
    grid=grids,
    cell=st.tuples(st.integers(1, 3), st.integers(1, 3)).filter(lambda c: c[0] * c[1] > 1),
    seed=seeds,
    batch=batches,
    data=st.data(),
)
def test_random_one_destination_per_cell(grid, cell, seed, batch, data):
    h, w = grid
    n = h * w
    sy, sx = cell
    strategy = tokenmerge.get_strategy("random", ratio=0.0, sy=sy, sx=sx)
    layout = TokenLayout(grid)
    capacity = strategy.capacity(layout, SITE)
    ids = window_id(grid, (min(sy, h), min(sx, w)))
    num_cells = len(set(ids))
    assert capacity == n - num_cells
    blind = plan_features(strategy, features_for(1, n, seed))
    full = strategy.make_plan(blind, layout, SITE, capacity, gen(seed))
    check_plan(full, n, 1, num_cells)
    assert full.batch == 1
    assert sorted(ids[t] for t in full.kept[0].tolist()) == list(range(num_cells))
    num_merge = data.draw(st.integers(0, capacity), label="num_merge")
    plan = strategy.make_plan(blind, layout, SITE, num_merge, gen(seed))
    check_plan(plan, n, 1, n - num_merge)
    by_cell: dict[int, set[int]] = {}
    for s, d in zip(plan.src[0].tolist(), dst_tokens(plan)[0].tolist(), strict=True):
        assert ids[s] == ids[d], "a source left its cell"
        by_cell.setdefault(ids[d], set()).add(d)
    assert all(len(d) == 1 for d in by_cell.values()), "two destinations in one cell"
    # one plan serves the whole batch
    x = torch.randn(batch, n, 2)
    assert plan.unmerge(plan.merge(x)).shape == x.shape


@FAST
@given(grid=grids, seed=seeds, other=seeds)
def test_random_is_content_blind(grid, seed, other):
    n = grid[0] * grid[1]
    strategy = tokenmerge.get_strategy("random", ratio=0.5)
    assert not strategy.uses_features
    layout = TokenLayout(grid)
    num_merge = min(n // 2, strategy.capacity(layout, SITE))
    first = strategy.make_plan(features_for(1, n, seed), layout, SITE, num_merge, gen(7))
    second = strategy.make_plan(features_for(1, n, other), layout, SITE, num_merge, gen(7))
    blind = strategy.make_plan(torch.empty(1, n, 0), layout, SITE, num_merge, gen(7))
    for field in ("kept", "src", "dst", "origin"):
        assert torch.equal(getattr(first, field), getattr(second, field)), field
        assert torch.equal(getattr(first, field), getattr(blind, field)), field


def test_random_draws_destinations_and_sources_uniformly():
    """Over many seeds every token is a destination 1/4 and a source 3/8 of the time."""
    strategy = tokenmerge.get_strategy("random", ratio=0.375)
    layout = TokenLayout((4, 4))
    trials = 200
    as_dst = torch.zeros(16)
    as_src = torch.zeros(16)
    blind = torch.empty(1, 16, 0)
    for seed in range(trials):
        full = strategy.make_plan(blind, layout, SITE, 12, gen(seed))
        as_dst[full.kept[0]] += 1
        plan = strategy.make_plan(blind, layout, SITE, 6, gen(seed))
        as_src[plan.src[0]] += 1
    # binomial standard deviations are about 0.03: 0.12 is four of them
    assert (as_dst / trials - 0.25).abs().max() < 0.12, as_dst
    assert (as_src / trials - 0.375).abs().max() < 0.12, as_src


def test_tome_random_destinations_cover_the_cell():
    strategy = tokenmerge.get_strategy("tome", ratio=0.5)
    layout = TokenLayout((4, 4))
    features = features_for(1, 16, 0)
    as_dst = torch.zeros(16)
    for seed in range(100):
        as_dst[strategy.make_plan(features, layout, SITE, 12, gen(seed)).kept[0]] += 1
    assert (as_dst / 100 - 0.25).abs().max() < 0.15, as_dst

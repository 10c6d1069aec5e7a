"""Opt-in autotuning of CPU plans (tensorpress.ops.set_autotune, ops/tt_autotune.py)."""

from __future__ import annotations

import pytest
import torch

from _util import random_cores, rel_err
from tensorpress.nn import TTLinear
from tensorpress.ops import (
    autotune_enabled,
    choose_plan,
    select_plan,
    set_autotune,
    tt_autotune,
    tt_matmul,
    tt_matmul_reference,
)
from tensorpress.ops.tt_plan import ranked_plans

SHAPES_1024_R8 = ((1, 4, 4, 8), (8, 8, 8, 8), (8, 8, 8, 8), (8, 4, 4, 1))


@pytest.fixture
def autotune():
    """Autotuning on for one test, with an empty cache; the previous setting restored after."""
    before = autotune_enabled()
    tt_autotune._autotuned.cache_clear()
    set_autotune(True)
    yield
    set_autotune(before)
    tt_autotune._autotuned.cache_clear()


def test_off_by_default_and_the_model_plan_is_the_first_ranked():
    assert not autotune_enabled()
    for batch in (1, 64, 256, 100_000):
        ranked = ranked_plans(SHAPES_1024_R8, batch)
        assert choose_plan(SHAPES_1024_R8, batch) == ranked[0]
        assert [p.cost for p in ranked] == sorted(p.cost for p in ranked)


def test_candidates_are_the_cheapest_few_within_the_slack():
    ranked = ranked_plans(SHAPES_1024_R8, 256, True)
    cands = tt_autotune.candidates(SHAPES_1024_R8, 256, True)
    assert cands[0] == ranked[0]
    assert list(cands) == list(ranked[: len(cands)])
    assert 1 < len(cands) <= tt_autotune.MAX_CANDIDATES
    assert all(p.cost <= ranked[0].cost * tt_autotune.COST_SLACK for p in cands)


def test_the_fastest_candidate_is_chosen_and_kept(autotune, monkeypatch):
    cands = tt_autotune.candidates(SHAPES_1024_R8, 256, True)
    timed = []

    def fake_seconds(x, cores, plan, training, run_plan):  # the model's runner-up is the fastest here
        timed.append(plan)
        return 1.0 if plan == cands[1] else 2.0

    monkeypatch.setattr(tt_autotune, "_median_seconds", fake_seconds)
    assert select_plan(SHAPES_1024_R8, 256) == cands[1]
    assert timed == list(cands)  # every candidate timed once
    assert select_plan(SHAPES_1024_R8, 256) == cands[1]
    assert len(timed) == len(cands)  # then kept: no second timing
    training = tt_autotune.candidates(SHAPES_1024_R8, 256, True, training=True)
    assert select_plan(SHAPES_1024_R8, 256, training=True) in training  # a training step is timed apart
    assert len(timed) == len(cands) + len(training)
    assert choose_plan(SHAPES_1024_R8, 256) == cands[0]  # the cost model alone: pure, no timing
    set_autotune(False)
    assert select_plan(SHAPES_1024_R8, 256) == cands[0]  # off again: the model's plan


def test_training_candidates_are_those_the_model_allows_in_training():
    """The single merged core is never a training candidate (its backward runs the merge chain
    over W-sized tensors); the autotune used to time it anyway."""
    shapes = ((1, 4, 4, 16), (16, 8, 8, 16), (16, 8, 8, 16), (16, 4, 4, 1))
    for batch in (1, 16, 256):
        allowed = ranked_plans(shapes, batch, True, True)
        cands = tt_autotune.candidates(shapes, batch, True, training=True)
        assert set(cands) <= set(allowed)
        assert all(not (len(p.groups) == 1 and not p.dense) for p in cands)


def test_the_ops_modules_import_each_other_without_a_cycle():
    """Every import among tensorpress.ops' modules (module level or inside a function) goes one
    way: the autotune gets the kernels passed in by ops.tt instead of importing it."""
    import ast
    from pathlib import Path

    import tensorpress.ops as ops

    root = Path(ops.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        name = f"tensorpress.ops.{path.stem}"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tensorpress.ops."):
                deps.add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.module == "tensorpress.ops":
                deps.update(f"tensorpress.ops.{a.name}" for a in node.names)
        graph[name] = deps - {name}
    graph.pop("tensorpress.ops.__init__", None)

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d))) for d in graph.get(start, ()))

    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, {m: graph[m] for m in cycles}
    assert "tensorpress.ops.tt" not in graph["tensorpress.ops.tt_autotune"]


def test_autotuned_layer_matches_the_float64_reference(autotune):
    gen = torch.Generator().manual_seed(5)
    cores = random_cores((4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8), dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(64, 1024, generator=gen, dtype=torch.float64, requires_grad=True)
    plan = select_plan([tuple(g.shape) for g in cores], 64, dtype=torch.float64, training=True)
    assert plan in tt_autotune.candidates(tuple(tuple(g.shape) for g in cores), 64, True, training=True)
    y = tt_matmul(x, cores)
    assert rel_err(y, tt_matmul_reference(x, cores)) <= 1e-12
    grads = torch.autograd.grad(y.sum(), [x, *cores])
    refs = torch.autograd.grad(tt_matmul_reference(x, cores).sum(), [x, *cores])
    for g, r in zip(grads, refs):
        assert rel_err(g, r) <= 1e-12


@pytest.mark.parametrize("training", [True, False])
def test_both_timings_run_and_pick_a_candidate(autotune, training):
    shapes = ((1, 4, 3, 4), (4, 5, 6, 1))
    plan = select_plan(shapes, 32, training=training)
    assert plan in tt_autotune.candidates(shapes, 32, True, training)
    assert tt_autotune._autotuned.cache_info().currsize == 1


def test_autotune_under_torch_compile(autotune):
    torch.manual_seed(3)
    torch._dynamo.reset()
    layer = TTLinear(256, 128, ranks=8)
    x = torch.randn(16, 256)
    compiled = torch.compile(layer, fullgraph=True)
    assert rel_err(compiled(x), layer(x)) <= 1e-6


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_set_autotune_wants_a_bool(bad):
    with pytest.raises(TypeError, match="enabled: expected a bool"):
        set_autotune(bad)
    assert not autotune_enabled()

"""CPConv2d's per-shape route choice (tensorpress.nn.conv_paths): decided by a scripted clock,
measured once per shape key, never while torch records or transforms the computation."""

import pytest
import torch

from _util import rel_err
from tensorpress.nn import CPConv2d, conv_paths, cp_conv2d


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setitem(conv_paths._ENABLED, "on", True)
    conv_paths.clear_cache()
    yield
    conv_paths.clear_cache()


class ScriptedClock:
    """A clock that only moves when a route runs: each route adds its scripted cost."""

    def __init__(self, monkeypatch, costs):
        self.now, self.costs, self.reads = 0.0, dict(costs), 0
        monkeypatch.setattr(conv_paths, "clock", self.read)
        for table in (cp_conv2d.POINTWISE, cp_conv2d.DEPTHWISE):
            for name, fn in list(table.items()):
                monkeypatch.setitem(table, name, self.costed(name, fn))

    def read(self):
        self.reads += 1
        return self.now

    def costed(self, name, fn):
        def run(*args):
            self.now += self.costs[name]
            return fn(*args)

        return run


def _layer(kernel=3, dtype=torch.float64):
    torch.manual_seed(0)
    return CPConv2d(6, 5, kernel, rank=4, padding=kernel // 2, dtype=dtype)


def _x(n=4, size=9, dtype=torch.float64):
    return torch.randn(n, 6, size, size, dtype=dtype)


def test_choice_follows_the_scripted_timings(monkeypatch):
    clock = ScriptedClock(monkeypatch, {"gemm": 2.0, "conv": 1.0, "fused": 3.0, "separable": 1.0})
    layer, x = _layer(), _x()
    y = layer(x)
    assert list(conv_paths.cached().values()) == [("conv", "separable", "conv")]
    assert rel_err(y, layer.to_conv()(x)) < 1e-12
    clock.costs.update(gemm=0.5, fused=0.5)
    assert layer.routes(x) == ("conv", "separable", "conv")  # cached
    conv_paths.clear_cache()  # measured again: the new timings
    assert layer.routes(x) == ("gemm", "fused", "gemm")


def test_a_cached_choice_is_kept_without_measuring(monkeypatch):
    clock = ScriptedClock(monkeypatch, {"gemm": 1.0, "conv": 2.0, "fused": 1.0, "separable": 2.0})
    layer, x = _layer(), _x()
    first = layer(x)
    assert layer.routes(x) == ("gemm", "fused", "gemm")
    reads = clock.reads
    clock.costs.update(gemm=9.0, fused=9.0)  # the timings change; the choice does not
    for _ in range(3):
        assert torch.equal(layer(x), first)
    assert clock.reads == reads and layer.routes(x) == ("gemm", "fused", "gemm")
    # another layer of the same geometry and weights shares the key
    assert torch.equal(_layer()(x), first) and clock.reads == reads


def test_ties_go_to_the_first_route(monkeypatch):
    ScriptedClock(monkeypatch, {"gemm": 1.0, "conv": 1.0, "fused": 1.0, "separable": 1.0})
    layer, x = _layer(), _x()
    assert layer.routes(x) == cp_conv2d.static_routes(layer.kernel_size)


def no_grad(fn):
    return torch.no_grad()(fn)


def test_the_key_separates_shapes_and_modes(monkeypatch):
    clock = ScriptedClock(monkeypatch, {"gemm": 1.0, "conv": 2.0, "fused": 1.0, "separable": 2.0})
    layer = _layer()
    calls = [
        lambda: layer(_x()),
        lambda: layer(_x(n=7)),  # same batch bucket [4, 8): no measurement
        lambda: layer(_x(n=8)),  # next bucket
        lambda: layer(_x(size=10)),  # spatial size
        lambda: layer(_x().to(memory_format=torch.channels_last)),  # layout
        lambda: layer(_x(n=4)[0]),  # unbatched: batch 1
        lambda: no_grad(layer)(_x()),  # no graph: timed forward only
        lambda: _layer(kernel=5)(_x()),  # geometry
        lambda: _layer(dtype=torch.float32)(_x(dtype=torch.float32)),  # dtype
    ]
    sizes = []
    for call in calls:
        call()
        sizes.append(len(conv_paths.cached()))
    assert sizes == [1, 1, 2, 3, 4, 5, 6, 7, 8]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        layer(_x())
    finally:
        torch.set_num_threads(threads)
    assert len(conv_paths.cached()) == 9 and clock.reads > 0


def test_channels_last_input_only_times_the_depthwise_routes(monkeypatch):
    ScriptedClock(monkeypatch, {"gemm": 0.0, "conv": 5.0, "fused": 5.0, "separable": 1.0})
    layer, x = _layer(), _x().to(memory_format=torch.channels_last)
    # no GEMM route for a channels_last input (it would be the same F.conv2d)
    assert layer.routes(x) == ("conv", "separable", "conv")
    assert rel_err(layer(x), layer.to_conv()(x)) < 1e-12


def test_training_measurement_leaves_grads_and_graph_alone(monkeypatch):
    ScriptedClock(monkeypatch, {"gemm": 1.0, "conv": 2.0, "fused": 2.0, "separable": 1.0})
    layer, x = _layer(), _x().requires_grad_()
    y = layer(x)
    assert all(p.grad is None for p in layer.parameters()) and x.grad is None
    (key,) = conv_paths.cached()
    assert key[-1] is True  # keyed as a training call
    y.sum().backward()
    ref = layer.to_conv()
    x2 = x.detach().requires_grad_()
    ref(x2).sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-12


def _count_measurements(monkeypatch):
    count = {"n": 0}
    real = conv_paths.fastest

    def counted(routes):
        count["n"] += 1
        return real(routes)

    monkeypatch.setattr(conv_paths, "fastest", counted)
    return count


@pytest.mark.parametrize("record", ["jit_trace", "vmap", "jacrev", "forward_ad", "autocast", "compile"])
def test_recording_and_transforms_never_measure(record, monkeypatch):
    count = _count_measurements(monkeypatch)
    layer, x = _layer(), _x()
    static = cp_conv2d.static_routes(layer.kernel_size)
    if record == "jit_trace":
        y = torch.jit.trace(layer, x, check_trace=False)(x)
    elif record == "vmap":
        y = torch.func.vmap(layer)(x.unsqueeze(0))[0]
    elif record == "jacrev":
        torch.func.jacrev(layer)(x[:1])
        y = None
    elif record == "forward_ad":
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            y = fwAD.unpack_dual(layer(fwAD.make_dual(x, torch.ones_like(x)))).primal
    elif record == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer.float()(x.float())
        y = None
    else:
        # reset after: a second shape would recompile CPConv2d.forward with dynamic shapes in
        # later tests (which inductor fails on, with or without the route choice)
        try:
            y = torch.compile(layer, backend="eager", fullgraph=True)(x)
        finally:
            torch._dynamo.reset()
    assert count["n"] == 0 and conv_paths.cached() == {}
    if y is not None:
        assert rel_err(y, layer.to_conv()(x)) < 1e-10
    assert static == ("gemm", "fused", "gemm")


def test_autotune_off_takes_the_static_routes(monkeypatch):
    count = _count_measurements(monkeypatch)
    conv_paths.set_autotune(False)
    try:
        layer, x = _layer(), _x()
        assert layer.routes(x) == cp_conv2d.static_routes(layer.kernel_size)
        assert rel_err(layer(x), layer.to_conv()(x)) < 1e-12
    finally:
        conv_paths.set_autotune(True)
    assert count["n"] == 0 and conv_paths.cached() == {}
    with pytest.raises(TypeError, match="bool"):
        conv_paths.set_autotune(1)


def test_an_empty_batch_is_not_measured(monkeypatch):
    count = _count_measurements(monkeypatch)
    layer = _layer()
    assert layer(_x(n=0)).shape == (0, 5, 9, 9)
    assert count["n"] == 0


def test_fastest_takes_the_smallest_time(monkeypatch):
    now = {"t": 0.0}
    monkeypatch.setattr(conv_paths, "clock", lambda: now["t"])
    # "a" ran during two bursts of other work (its best is 1), "b" is steadily 2
    runs = {"a": iter([0, 50, 40, 1]), "b": iter([0, 2, 2, 2])}

    def route(name):
        def run():
            now["t"] += next(runs[name])

        return run

    assert conv_paths.fastest({"b": route("b"), "a": route("a")}) == "a"
    assert conv_paths.fastest({"only": lambda: None}) == "only"


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(conv_paths, "MAX_KEYS", 3)
    for k in range(5):
        conv_paths.cached_choice(("k", k), lambda k=k: k)
    assert list(conv_paths.cached()) == [("k", 2), ("k", 3), ("k", 4)]


@pytest.mark.parametrize("mode", ["inference_mode", "frozen", "frozen_input_grad", "half"])
def test_measured_calls_in_every_grad_setting(mode, monkeypatch):
    count = _count_measurements(monkeypatch)
    layer, x = _layer(), _x()
    if mode.startswith("frozen"):
        layer.requires_grad_(False)
    if mode == "frozen_input_grad":
        x.requires_grad_()
    if mode == "half":
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    if mode == "inference_mode":
        with torch.inference_mode():
            y = layer(x)
    else:
        y = layer(x)
    (key,) = conv_paths.cached()
    assert key[-1] is (mode in ("frozen_input_grad", "half")) and count["n"] == 1
    tol = 2e-2 if mode == "half" else 1e-12
    assert rel_err(y.double(), layer.double().to_conv()(x.detach().double())) < tol
    if mode == "frozen_input_grad":
        y.sum().backward()
        assert x.grad is not None and all(p.grad is None for p in layer.parameters())


def test_near_ties_are_decided_by_a_run_off(monkeypatch):
    """Routes within RUNOFF_MARGIN of the best after REPEATS rounds run RUNOFF_REPEATS more
    times each and the least time of all runs decides; routes further off run no more."""
    script = {
        "a": [1.00] * conv_paths.REPEATS + [1.00] * conv_paths.RUNOFF_REPEATS,
        "b": [1.05] * conv_paths.REPEATS + [0.90] * conv_paths.RUNOFF_REPEATS,  # one busy early moment
        "c": [2.00] * conv_paths.REPEATS,
    }
    now, runs = [0.0], {k: 0 for k in script}

    def route(name):
        def run():
            if runs[name] > 0:  # the warm-up costs nothing
                now[0] += script[name][runs[name] - 1]
            runs[name] += 1

        return run

    monkeypatch.setattr(conv_paths, "clock", lambda: now[0])
    assert conv_paths.fastest({k: route(k) for k in script}) == "b"
    assert runs == {"a": 1 + 7, "b": 1 + 7, "c": 1 + 3}
    assert conv_paths.REPEATS + conv_paths.RUNOFF_REPEATS == 7

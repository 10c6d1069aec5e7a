"""compress() on models that use modules in more than one place, mix train/eval submodules or
fail midway (issue 27, items 4, 5 and 13).

The contract every case in CASES is held to (test_compress_contract): the original model is
bit for bit what it was (every parameter and buffer) with every module's own training flag,
after success and after a bad calibration batch in the middle of the list; the returned model
has the original's flags; a module registered at several places is one replacement; tied
weights stay tied; the report's parameter counts are those of the returned model and its
errors are the errors measured on it. A new model shape gets all of this by joining CASES.
All models are float64, so measured and reported numbers agree to ~1e-9.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import tensorpress as tp
from _util import rel_err
from tensorpress.compress import CalibrationBatchError, GramStats, fit_activation, sequential
from tensorpress.nn import LowRankLinear

F64 = torch.float64
METHODS = ("svd", "whitened", "activation")


# ----------------------------------------------------------------------------- models
class Twice(nn.Module):
    """``lin`` applied twice per forward; a BatchNorm left in training mode (its buffers must
    not move) and a dropout the user set to eval."""

    def __init__(self, d=16, out=8):
        super().__init__()
        self.norm = nn.BatchNorm1d(d)
        self.lin = nn.Linear(d, d)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(self.drop(self.lin(self.act(self.lin(self.norm(x))))))


def registered_twice(d=16, out=8):
    """Sequential(lin, act, lin, head): one module at positions 0 and 2."""
    lin = nn.Linear(d, d)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(d, out))


class Block(nn.Module):
    def __init__(self, d, mix=None, repeat=1):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.mix = mix  # None, or a module shared by every block
        self.repeat = repeat

    def forward(self, h):
        for _ in range(self.repeat):  # repeat > 1: the block applies its own `a` again
            h = h + torch.tanh(self.a(h))
        if self.mix is not None:
            h = h + torch.tanh(self.mix(h))
        return h + self.b(torch.tanh(h))


class Stack(nn.Module):
    def __init__(self, d=16, n=3, shared_mix=False, repeat=1):
        super().__init__()
        mix = nn.Linear(d, d) if shared_mix else None
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d, mix, repeat) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


class TiedLM(nn.Module):
    """An embedding tied to the output head, and two layers sharing one weight (own biases)."""

    def __init__(self, vocab=24, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, d)
        self.down = nn.Linear(d, d)
        self.down.weight = self.up.weight
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + torch.tanh(self.down(torch.tanh(self.up(h))))
        return self.head(torch.tanh(self.mid(h)))


class ConvTwice(nn.Module):
    """A conv applied twice (its rows: the input patches of both calls)."""

    def __init__(self, c=6, out=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.out = nn.Conv2d(c, out, 3, padding=1)

    def forward(self, x):
        return self.out(torch.tanh(self.conv(torch.tanh(self.conv(x)))))


def _features(n_batches=5, rows=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=F64) * torch.logspace(0, -1.5, d, dtype=F64)
    return [torch.randn(rows, d, generator=g, dtype=F64) @ mix + 0.5 for _ in range(n_batches)]


def _tokens(n_batches=5, vocab=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 12), generator=g) for _ in range(n_batches)]


def _twice():
    torch.manual_seed(0)
    model = Twice().to(F64).train()
    model.drop.eval()
    return model, _features(), {"ranks": {"lin": 4, "head": 3}}


def _registered_twice():
    torch.manual_seed(1)
    model = registered_twice().to(F64).eval()
    model[1].train()
    return model, _features(seed=1), {"budget": 0.45}


def _shared_across_blocks():
    torch.manual_seed(2)
    model = Stack(shared_mix=True).to(F64).train()
    model.blocks[1].eval()
    return model, _features(seed=2), {"budget": 0.5}


def _repeat_in_block():
    torch.manual_seed(3)
    model = Stack(repeat=2).to(F64).eval()
    model.blocks[0].train()
    return model, _features(seed=3), {"budget": 0.5}


def _tied():
    torch.manual_seed(4)
    model = TiedLM().to(F64).train()
    model.mid.eval()
    return model, _tokens(seed=4), {"budget": 0.5}


def _conv_twice():
    torch.manual_seed(5)
    model = ConvTwice().to(F64).train()
    model.out.eval()
    g = torch.Generator().manual_seed(5)
    return (
        model,
        [torch.randn(4, 6, 8, 8, generator=g, dtype=F64) for _ in range(4)],
        {"structure": "tucker", "budget": 0.5},
    )


# name -> () -> (model, calibration batches, compress() keyword arguments)
CASES = {
    "twice": _twice,
    "registered_twice": _registered_twice,
    "shared_across_blocks": _shared_across_blocks,
    "repeat_in_block": _repeat_in_block,
    "tied": _tied,
    "conv_twice": _conv_twice,
}


def _bad_batch(calib):
    """A batch the model cannot run: one feature (channel) too many, or a token id past the
    vocabulary."""
    x = calib[0]
    return x + 10**6 if x.dtype == torch.int64 else torch.cat([x, x[:, :1]], dim=1)


# ----------------------------------------------------------------------------- helpers
@contextmanager
def _no_warning():
    """pytest.warns' counterpart: no warning of compress() (only the tied case has one)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    mine = [str(w.message) for w in seen if str(w.message).startswith("compress")]
    assert not mine, mine


def _snapshot(model):
    """(every parameter and buffer cloned, every module's own training flag)."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return state, [(name, m.training) for name, m in model.named_modules(remove_duplicate=False)]


def _assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict(keep_vars=True)
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k].detach(), v), k
    assert [(name, m.training) for name, m in model.named_modules(remove_duplicate=False)] == flags
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def _calls(model, name, batch, keep_inputs):
    """[(input, output)] of every call of layer ``name`` in one forward pass."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda _m, args, out: seen.append((args[0] if keep_inputs else None, out))
    )
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    return seen


def _measured_call_errors(original, returned, calib, name, one_shot):
    """||Y_k - Y^_k|| / ||Y_k|| of each call k of layer ``name`` over the calibration batches:
    Y_k the original layer's output at its k-th call in the original model, Y^_k the returned
    model's layer on the same input (one-shot methods) or at its k-th call in the returned
    model (sequential methods). Both models are run in eval mode, as compress() runs them."""
    original, returned = copy.deepcopy(original).eval(), copy.deepcopy(returned).eval()
    new = returned.get_submodule(name)
    err2, energy = None, None
    for batch in calib:
        ref = _calls(original, name, batch, keep_inputs=True)
        got = [(None, new(x)) for x, _ in ref] if one_shot else _calls(returned, name, batch, keep_inputs=False)
        assert len(got) == len(ref)
        if err2 is None:
            err2, energy = [0.0] * len(ref), [0.0] * len(ref)
        for k, ((_, y), (_, y_hat)) in enumerate(zip(ref, got)):
            err2[k] += (y - y_hat).double().square().sum().item()
            energy[k] += y.double().square().sum().item()
    return [(e / en) ** 0.5 for e, en in zip(err2, energy)]


def _layer_inputs(model, name, calib):
    """Every call's input rows of layer ``name`` over the batches (the model in eval mode)."""
    model = copy.deepcopy(model).eval()
    return torch.cat([x.reshape(-1, x.shape[-1]) for batch in calib for x, _ in _calls(model, name, batch, True)])


def _dense(module):
    if isinstance(module, LowRankLinear):
        return module.to_dense(), module.bias
    return module.weight, module.bias


def _whitened_reference(layer, rows, rank):
    """The whitened fit of ``layer`` on all its calls' input rows, concatenated."""
    stats = GramStats(rows.shape[1], paired=False)
    stats.update(rows)
    return fit_activation(layer.weight, layer.bias, stats, rank)


def _tied_groups(model):
    """[(module names)] of the modules holding each parameter held by more than one module."""
    holders = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    return sorted(tuple(names) for names in holders.values() if len(names) > 1)


# ----------------------------------------------------------------------------- the contract
def _error_column(method: str) -> dict:
    """method="svd" gathers statistics (and so passes over every batch) only for the report's
    error column: ask for it, so the contract covers the errors and the passes."""
    return {"report_error": True} if method == "svd" else {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_compress_contract(case, method):
    model, calib, kw = CASES[case]()
    snap = _snapshot(model)
    with pytest.warns(UserWarning, match="tied") if case == "tied" else _no_warning():
        small, report = tp.compress(model, calib, method=method, **kw, **_error_column(method))
    # the original: bit for bit, every module's own flag, no hook left
    _assert_unchanged(model, snap)
    # the returned model: the original's flags at every name
    assert [(n, m.training) for n, m in small.named_modules(remove_duplicate=False) if n in dict(snap[1])] == snap[1]
    # a module registered under several names is one module there too
    names = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    for group in names.values():
        assert len({id(small.get_submodule(n)) for n in group}) == 1, group
    # tied weights stay tied, and the layers holding them are reported as skipped
    assert _tied_groups(small) == _tied_groups(model)
    tied = {
        n for group in _tied_groups(model) for n in group if isinstance(model.get_submodule(n), (nn.Linear, nn.Conv2d))
    }
    assert set(report.skipped) == tied
    # the report counts the returned model, each shared module once
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert report.model_params_after == count(small)
    assert (
        report.model_params_before - report.layer_params_before + report.layer_params_after == report.model_params_after
    )
    for r in report.layers:
        assert r.params_after == count(small.get_submodule(r.name)), r.name
        assert r.aliases == names[id(model.get_submodule(r.name))][1:]
    # and the errors measured on it (the worst call of a layer called several times)
    for r in report.layers:
        measured = _measured_call_errors(model, small, calib, r.name, one_shot=method != "activation")
        assert r.calls == len(measured), r.name
        assert r.rel_error == pytest.approx(max(measured), rel=1e-6, abs=1e-9), r.name
        if r.calls > 1:
            assert r.call_errors == pytest.approx(measured, rel=1e-9, abs=1e-12), r.name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_compress_contract_after_a_bad_batch_in_the_middle(case, method):
    model, calib, kw = CASES[case]()
    snap = _snapshot(model)
    bad = calib[:2] + [_bad_batch(calib)] + calib[2:]
    with pytest.raises(CalibrationBatchError, match=r"calib\[2\]") as info:
        with pytest.warns(UserWarning, match="tied") if case == "tied" else _no_warning():
            tp.compress(model, bad, method=method, **kw, **_error_column(method))
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, (RuntimeError, IndexError))  # torch's own error, chained
    assert str(info.value.__cause__) in str(info.value)
    _assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- item 4
@pytest.mark.parametrize("method", ["whitened", "activation"])
def test_a_layer_called_twice_is_fitted_on_both_calls(method):
    """Its fit equals the whitened fit on the rows of both calls, concatenated (for the first
    layer the compressed model's inputs equal the original's, so "activation" agrees too)."""
    model, calib, kw = _twice()
    small, report = tp.compress(model, calib, method=method, **kw)
    rows = _layer_inputs(model, "lin", calib)
    assert rows.shape[0] == 2 * sum(c.shape[0] for c in calib)
    want = _whitened_reference(model.lin, rows, 4)
    weight, bias = _dense(small.lin)
    assert rel_err(weight, want.weight()) < 1e-9
    assert rel_err(bias, want.bias) < 1e-9
    row = {r.name: r for r in report.layers}["lin"]
    assert row.calls == 2 and len(row.call_errors) == 2 and row.rel_error == max(row.call_errors)


@pytest.mark.parametrize("method", ["whitened", "activation"])
def test_a_module_registered_twice_is_replaced_at_both_places_and_counted_once(method):
    model, calib, kw = _registered_twice()
    small, report = tp.compress(model, calib, method=method, **kw)
    assert isinstance(small[0], LowRankLinear) and small[2] is small[0]
    assert report.mode in ("one-shot", "model")
    if method == "activation":  # the Sequential holds one block twice: no single-block replay
        assert any("block replay" in note and "several positions" in note for note in report.notes), report.notes
    assert report.kept_fraction <= 0.45 + 1e-12
    assert report.model_params_after == sum(p.numel() for p in small.parameters()) < report.model_params_before
    row = {r.name: r for r in report.layers}["0"]
    assert row.aliases == ["2"] and row.calls == 2
    if method == "whitened":
        want = _whitened_reference(model[0], _layer_inputs(model, "0", calib), row.rank)
        assert rel_err(_dense(small[0])[0], want.weight()) < 1e-9


def test_a_module_shared_across_blocks_turns_the_block_replay_off_and_sees_every_call():
    model, calib, kw = _shared_across_blocks()
    small, report = tp.compress(model, calib, method="activation", **kw)
    assert report.mode == "model"
    assert any("'blocks.0.mix'" in note and "block 1" in note for note in report.notes)
    mix = small.blocks[0].mix
    assert isinstance(mix, LowRankLinear) and all(blk.mix is mix for blk in small.blocks)
    row = {r.name: r for r in report.layers}["blocks.0.mix"]
    assert row.calls == 3 and row.aliases == ["blocks.1.mix", "blocks.2.mix"]
    measured = _measured_call_errors(model, small, calib, "blocks.0.mix", one_shot=False)
    assert row.call_errors == pytest.approx(measured, rel=1e-9, abs=1e-12)


def test_a_layer_applied_twice_inside_its_block_keeps_the_block_replay(monkeypatch):
    """The replay of one block sees both calls: the same model as whole-model passes."""
    model, calib, kw = _repeat_in_block()
    replayed, report = tp.compress(model, calib, method="activation", **kw)
    row = {r.name: r for r in report.layers}["blocks.0.a"]
    measured = _measured_call_errors(model, replayed, calib, "blocks.0.a", one_shot=False)
    assert len(measured) == 2 and row.rel_error == pytest.approx(max(measured), rel=1e-6)
    assert report.mode == "blocks" and not report.notes and row.calls == 2
    monkeypatch.setattr(sequential, "find_blocks", lambda model, targets: None)
    whole, report_whole = tp.compress(model, calib, method="activation", **kw)
    assert report_whole.mode == "model"
    for (name, a), (_, b) in zip(replayed.named_parameters(), whole.named_parameters()):
        assert rel_err(a, b) < 1e-10, name
    for r, w in zip(report.layers, report_whole.layers):
        assert r.rel_error == pytest.approx(w.rel_error, rel=1e-9), r.name


def test_tied_weights_stay_tied_and_the_tie_is_reported():
    model, calib, kw = _tied()
    with pytest.warns(UserWarning, match="tied"):
        small, report = tp.compress(model, calib, method="activation", **kw)
    assert small.head.weight is small.emb.weight and small.down.weight is small.up.weight
    assert type(small.head) is nn.Linear and type(small.up) is nn.Linear and type(small.down) is nn.Linear
    assert isinstance(small.mid, LowRankLinear)
    assert set(report.skipped) == {"head", "up", "down"}
    assert "'emb'" in report.skipped["head"] and "'down'" in report.skipped["up"]
    assert [r.name for r in report.layers] == ["mid"]
    assert any(line.startswith("skipped head:") for line in report.summary_lines())
    with pytest.raises(ValueError, match=r"ranks: layer 'head' cannot be compressed: .*tied"):
        tp.compress(model, calib, ranks={"head": 2, "mid": 2})
    only_tied = nn.Sequential(model.up, nn.Tanh(), model.down)
    with pytest.raises(ValueError, match="every layer to compress has tied weights"):
        tp.compress(only_tied, _features())


# ----------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("method", ["whitened", "activation"])
def test_mixed_train_eval_modes_are_restored_module_by_module(method):
    model, calib, kw = _twice()
    model.lin.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    assert sorted(set(flags.values())) == [False, True]
    small, _ = tp.compress(model, calib, method=method, **kw)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: small.get_submodule(n).training for n in flags} == flags
    assert all(not m.training for m in small.lin.modules())  # the replacement takes the layer's flag


def test_modes_and_buffers_are_restored_when_compress_fails_midway():
    model, calib, kw = _twice()
    snap = _snapshot(model)
    with pytest.raises(CalibrationBatchError):
        tp.compress(model, calib[:3] + [_bad_batch(calib)], method="activation", **kw)
    _assert_unchanged(model, snap)
    assert model.training and model.norm.training and not model.drop.training


# ----------------------------------------------------------------------------- item 13
@pytest.mark.parametrize(
    "method,case", [("whitened", "twice"), ("activation", "twice"), ("activation", "repeat_in_block"), ("svd", "tied")]
)
def test_a_bad_batch_in_the_middle_is_named_with_torchs_error_chained(method, case):
    model, calib, kw = CASES[case]()
    bad = calib[:3] + [_bad_batch(calib)] + calib[3:]
    with pytest.raises(ValueError, match=r"^calib\[3\]: the model cannot run on this calibration batch") as info:
        with pytest.warns(UserWarning) if case == "tied" else _no_warning():
            tp.compress(model, bad, method=method, **kw, **_error_column(method))
    cause = info.value.__cause__
    assert cause is not None and type(cause).__name__ in str(info.value)


def test_layer_sensitivity_replaces_a_module_registered_twice_at_both_places():
    """The rank rules' sensitivities measure the model with the layer replaced everywhere."""
    from tensorpress.compress.allocate import layer_sensitivity

    model, calib, _ = _registered_twice()
    model.eval()
    lin = model[0]
    fit = LowRankLinear.from_dense(lin, 3)
    both = copy.deepcopy(model)
    both[0] = both[2] = copy.deepcopy(fit)
    with torch.no_grad():
        err = sum((both(x) - model(x)).square().sum().item() for x in calib)
        energy = sum(model(x).square().sum().item() for x in calib)
    got = layer_sensitivity(model, calib, {"0": lin}, {"0": fit}, {"0": 1.0})
    assert got["0"] == pytest.approx(err / energy, rel=1e-12)
    assert model[0] is lin and model[2] is lin  # restored at both places


def test_a_model_that_is_itself_the_layer_is_refused():
    """Its replacement cannot be put inside a copy of it: no silently dense "compressed" model."""
    with pytest.raises(ValueError, match=r"model: is itself a layer to compress \(Linear\).*nn.Sequential"):
        tp.compress(nn.Linear(16, 16).to(F64), _features(), budget=0.3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_and_load_keep_shared_modules_and_ties(case, tmp_path):
    """save_compressed / load_compressed give back the returned model: a module registered
    under several names is replaced at every place (and stays one module), ties stay tied."""
    from tensorpress.compress import load_compressed, save_compressed

    model, calib, kw = CASES[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = tp.compress(model, calib, method="svd", **kw)
    path = save_compressed(small, report, tmp_path / "small.safetensors")
    again = load_compressed(model, path)
    for n, m in small.named_modules(remove_duplicate=False):
        assert type(again.get_submodule(n)) is type(m), n
    assert _tied_groups(again) == _tied_groups(small)
    small.eval(), again.eval()
    with torch.no_grad():
        for batch in calib[:2]:
            assert torch.equal(again(batch), small(batch))

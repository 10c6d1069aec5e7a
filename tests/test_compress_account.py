"""Every layer accounted for (issue 28, item 3): compress() says what it did with every
nn.Linear / conv layer of the model, and why; the report's rows and ranks read the same in
every mode; progress shows by default where someone watches."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from torch import nn

import tensorpress as tp

F64 = torch.float64


class FiveLayers(nn.Module):
    """The layers a real CNN has: a 1-input-channel stem, a grouped and a depthwise conv, a
    normal conv (stride 2: its rows differ from the stem's) and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        for layer in (self.stem, self.grouped, self.depthwise, self.conv):
            x = torch.relu(layer(x))
        return self.head(x.mean((2, 3)))


def _five(seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return FiveLayers().to(F64).eval(), [torch.randn(4, 1, 8, 8, generator=g, dtype=F64) for _ in range(3)]


def _by_name(report):
    return {a.name: a for a in report.account}


@pytest.mark.parametrize("method", ["activation", "whitened"])
def test_tucker_report_accounts_for_all_five_layers(method):
    model, calib = _five()
    _, report = tp.compress(model, calib, structure="tucker", method=method, budget=0.5)
    acc = _by_name(report)
    assert list(acc) == ["stem", "grouped", "depthwise", "conv", "head"]  # model order
    assert {n: a.status for n, a in acc.items()} == {
        "stem": "skipped",
        "grouped": "skipped",
        "depthwise": "skipped",
        "conv": "compressed",
        "head": "skipped",
    }
    assert "one input channel" in acc["stem"].why
    assert "grouped conv (groups=2)" in acc["grouped"].why
    assert "depthwise conv" in acc["depthwise"].why
    assert "nn.Conv2d only" in acc["head"].why and "'lowrank' or 'tt'" in acc["head"].why
    (row,) = report.layers
    assert acc["conv"].why.startswith(f"tucker rank {row.rank}")
    assert acc["grouped"].kind == "Conv2d(8->8, 3x3, groups=2)" and acc["head"].kind == "Linear(16->10)"
    assert report.account_counts() == {"compressed": 1, "kept dense": 0, "skipped": 4, "excluded": 0}
    # shown by str(report), report.md and report.json
    text = str(report)
    assert "every Linear/conv layer of the model (5): 1 compressed" in text
    for name in acc:
        assert name in text
    assert "| depthwise | Conv2d(8->8, 3x3, groups=8) | skipped |" in report.to_markdown()
    assert [a["status"] for a in json.loads(report.to_json())["account"]] == [a.status for a in acc.values()]


def test_excluded_layers_and_the_structures_own_reasons():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 1)
    ).to(F64)
    calib = [torch.randn(6, 3, 4, 4, dtype=F64)]
    _, report = tp.compress(model, calib, structure="lowrank", method="whitened", budget=0.5, exclude=["4"])
    acc = _by_name(report)
    assert acc["4"].status == "excluded" and "exclude pattern '4'" in acc["4"].why
    assert acc["0"].status == "skipped" and "structure='tucker' or 'cp'" in acc["0"].why
    assert acc["5"].status == "skipped" and "a side of one feature" in acc["5"].why
    assert acc["2"].status == "compressed"
    _, report = tp.compress(model, calib, structure="lowrank", method="whitened", budget=0.5, include=["2"])
    assert _by_name(report)["4"].status == "excluded" and "no include pattern" in _by_name(report)["4"].why


def test_a_rank_for_a_skipped_layer_says_why():
    model, calib = _five()
    with pytest.raises(ValueError, match="'stem' is skipped: one input channel"):
        tp.compress(model, calib, structure="tucker", ranks={"stem": 2, "conv": 3})


def test_kept_dense_layers_show_dense_as_their_rank_and_why():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).to(F64)
    calib = [torch.randn(40, 8, dtype=F64)]
    _, report = tp.compress(model, calib, ranks={"0": 2, "2": None})
    acc = _by_name(report)
    assert acc["2"].status == "kept dense" and "ranks['2'] is None" in acc["2"].why
    assert acc["0"].status == "compressed"
    assert [r.rank_text for r in report.layers] == ["2", "dense"]
    dense_row = report.table().splitlines()[2].split()
    assert dense_row[:3] == ["2", "8x8", "dense"]


def test_unsupported_types_and_tied_weights_are_listed():
    torch.manual_seed(2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(4, 4, 3)
            self.attn = nn.MultiheadAttention(8, 2)  # out_proj: a subclass of nn.Linear
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.c = nn.Linear(8, 8)

        def forward(self, x):
            h = self.attn(x, x, x)[0]
            return self.c(self.b(torch.tanh(self.a(h))))

    model = Model().to(F64)
    calib = [torch.randn(5, 2, 8, dtype=F64)]
    with pytest.warns(UserWarning, match="tied"):
        _, report = tp.compress(
            model, calib, structure="lowrank", method="svd", budget=0.5, include=["a", "b", "c", "attn.*"]
        )
    acc = _by_name(report)
    assert acc["conv1d"].status == "skipped" and "Conv1d: structure='lowrank' replaces nn.Linear" in acc["conv1d"].why
    assert acc["attn.out_proj"].status == "skipped" and "unsupported type" in acc["attn.out_proj"].why
    assert acc["a"].status == acc["b"].status == "skipped" and "tied" in acc["a"].why
    assert set(report.skipped) == {"a", "b"}  # the tied layers, as before
    assert acc["c"].status == "compressed"


def test_calibration_rows_mean_the_same_in_sequential_and_one_shot_mode():
    """Before: the last fitted layer's rows in sequential mode, the first's in one-shot mode."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)).to(F64)
    calib = [torch.randn(2, 3, 8, 8, dtype=F64) for _ in range(3)]
    rows = {}
    for method in ("activation", "whitened"):
        _, report = tp.compress(model, calib, structure="tucker", method=method, budget=0.5)
        assert [r.rows for r in report.layers] == [6 * 8 * 8, 6 * 4 * 4]  # output positions of every image
        rows[method] = report.calibration_rows
        assert "'0' saw" in str(report)
    assert rows["activation"] == rows["whitened"] == 6 * 8 * 8


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_defaults_to_on_when_stderr_is_a_terminal(monkeypatch):
    from tensorpress.compress.progress import show_progress

    assert show_progress(True) and not show_progress(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not show_progress(None)
    model, calib = _five()
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert show_progress(None)
    tp.compress(model, calib, structure="tucker", method="whitened", budget=0.5)
    assert "fitting (tucker, whitened)" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    tp.compress(model, calib, structure="tucker", method="whitened", budget=0.5, progress=False)
    assert quiet.getvalue() == ""

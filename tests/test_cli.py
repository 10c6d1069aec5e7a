"""The command line: argument handling of `tensorpress compress` and `bench` (the full default
run is the main job, measured in benchmarks; here a tiny run checks every output is written)."""

from __future__ import annotations

import json

import pytest

from tensorpress import cli


def test_compress_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["compress", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--budget", "--method", "--rank-rule", "--calib", "--sweep", "--out", "--max-memory"):
        assert opt in out


def test_compress_max_memory_is_parsed_and_reaches_the_job(monkeypatch, capsys):
    from tensorpress.cli import compress_job as job

    seen = {}
    monkeypatch.setattr(job, "run_job", lambda cfg: seen.setdefault("cfg", cfg))
    assert cli.main(["compress", "--max-memory", "1.5G", "--quiet"]) == 0
    assert seen["cfg"].max_memory == int(1.5 * (1 << 30))
    with pytest.raises(SystemExit):
        cli.main(["compress", "--max-memory", "lots"])
    assert "--max-memory" in capsys.readouterr().err


def test_compress_rejects_bad_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compress", "--method", "magic"])
    assert "magic" in capsys.readouterr().err


def test_small_compress_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(
        [
            "compress",
            "--calib",
            "32",
            "--eval",
            "16",
            "--sweep",
            "0.5",
            "--compare",
            "svd,activation",
            "--rank-rule",
            "uniform",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    for name in ("report.json", "report.md", "layers.png", "compression.png", "model.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "report.json").read_text())
    assert len(summary["report"]["layers"]) == 36
    assert abs(summary["report"]["kept_fraction"] - 0.5) < 0.01
    by = {r["method"]: r["mean_cosine"] for r in summary["sweep"]}
    assert by["activation"] > by["svd"]
    assert 0 < summary["report"]["quality"]["mean_cosine"] <= 1
    assert "mean_cosine" in capsys.readouterr().out


def test_bench_outside_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "a" / "b" / "cli.py"))
    assert cli.main(["bench"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_small_image_run_compresses_the_cnn_conv_with_tucker(tmp_path, capsys):
    out = tmp_path / "cnn"
    code = cli.main(
        [
            "compress",
            "--model",
            "mnist-cnn",
            "--structure",
            "tucker",
            "--budget",
            "0.3",
            "--calib",
            "200",
            "--eval",
            "300",
            "--sweep",
            "0.2",
            "--compare",
            "svd,activation",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    # the run ends with every layer accounted for: the 1-input-channel stem and the Linear head
    # are named with their reasons, not dropped silently
    printed = capsys.readouterr().out
    account = printed[printed.index("every Linear/conv layer of the model (4)") :]
    for name, status, why in (
        ("features.0", "skipped", "one input channel"),
        ("features.3", "compressed", "tucker rank"),
        ("classifier.0", "skipped", "replaces nn.Conv2d only"),
        ("classifier.2", "skipped", "replaces nn.Conv2d only"),
    ):
        line = next(row for row in account.splitlines() if row.startswith(name + " "))
        assert status in line and why in line, line
    summary = json.loads((out / "report.json").read_text())
    assert [a["status"] for a in summary["report"]["account"]] == ["skipped", "compressed", "skipped", "skipped"]
    assert "| features.0 | Conv2d(1->32, 3x3) | skipped |" in (out / "report.md").read_text()
    (layer,) = summary["report"]["layers"]
    assert layer["name"] == "features.3" and layer["structure"] == "tucker"
    assert summary["config"]["rank_rule"] is None  # "auto": uniform for the tensor structures
    assert summary["report"]["kept_fraction"] <= 0.3
    assert summary["report"]["quality"]["accuracy"] > 0.9
    by = {r["method"]: r["agreement"] for r in summary["sweep"]}
    assert by["activation"] >= by["svd"]
    from tensorpress.compress.saving import load_compressed
    from tensorpress.nn import TuckerConv2d
    from tensorpress.zoo import mnist

    back = load_compressed(mnist.load_mnist_cnn(), out / "model.safetensors")
    assert isinstance(back.features[3], TuckerConv2d)

"""The README's example runs as written."""

import pathlib
import re

import pytest


def _blocks():
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_readme_example_runs():
    blocks = _blocks()
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_readme_compress_example_runs(tmp_path, monkeypatch):
    blocks = _blocks()
    assert len(blocks) >= 2, "README.md has no compress example"
    scope = {}
    exec(compile(blocks[1].replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), scope)
    x = scope["calib"][0]
    assert scope["report"].kept_fraction <= 0.5
    assert (scope["again"](x) - scope["small"](x)).abs().max().item() < 1e-5

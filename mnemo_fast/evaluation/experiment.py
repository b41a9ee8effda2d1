"""``mnemo-fast experiment``: every method on the same trained models, one table, one figure.

Models are trained once with mnemonic codes and cached (safetensors, with their codes) under
``--cache``; retrained references too. Each (dataset, model, seed, forget set, method) gives
one JSON row appended to ``<cache>/results.jsonl``; the report (markdown tables, mean +- std)
and the figure are built from the rows of the configurations asked for, so a rerun only
computes what is missing (``--fresh`` recomputes the rows).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..codes import MnemonicCodes
from ..method import forget
from ..training.train import train_with_codes
from . import baselines as B
from . import data as data_mod
from . import metrics as M
from . import models as models_mod
from .accuracy import evaluate
from .resnet import resnet18

EPOCHS = {"digits": 40, "fashion-mnist": 10}
PAPER_LAMBDAS = (1e-3, 10.0)      # the paper's MNIST MLP setting
ORACLE_GRID = [10 ** (k / 2) for k in range(-12, 1)]   # 1e-6 .. 1, half decades, lambda2 = 10
METHODS = ("original", "retrain", "finetune", "neggrad+", "fisher", "ssd", "ssd-orig", "lfssd",
           "lfssd-orig", "mnemonic-paper", "mnemonic-auto", "mnemonic-misclassify",
           "mnemonic-oracle", "mnemonic-data-k1", "mnemonic-data-k10")

#: Baselines that take (model, train data, forget classes): method -> (function, fixed options).
DATA_BASELINES = {
    "finetune": (B.finetune, {}),
    "neggrad+": (B.neggrad_plus, {}),
    "fisher": (B.fisher_forgetting, {}),
    "ssd": (B.ssd, {"estimator": "per_sample"}),
    "ssd-orig": (B.ssd, {"estimator": "original_batch"}),
    "lfssd": (B.lfssd, {"estimator": "per_sample"}),
    "lfssd-orig": (B.lfssd, {"estimator": "original_batch"}),
}
SEEDED = ("finetune", "neggrad+", "fisher")   # baselines that take a seed


@dataclass
class Case:
    """One trained model of the experiment: where it came from and the data it saw."""

    data: str
    model: str
    seed: int
    epochs: int
    t_mix: float
    cache: Path
    net: torch.nn.Module
    codes: MnemonicCodes
    train: torch.utils.data.TensorDataset
    test: torch.utils.data.TensorDataset

    def path(self, suffix: str = "") -> Path:
        return self.cache / f"{self.data}-{self.model}-s{self.seed}-e{self.epochs}-t{self.t_mix}{suffix}.safetensors"


def build_model(name: str, shape, classes: int) -> torch.nn.Module:
    if name == "resnet":
        return resnet18(shape, classes, width=16)
    return models_mod.build(name, shape, classes)


def load_data(name: str, limit: int | None):
    if name == "digits":
        return data_mod.digits()
    train, test = data_mod.fashion_mnist()
    if limit:
        idx = _training_order(len(train))[:limit]
        train = torch.utils.data.TensorDataset(train.tensors[0][idx], train.tensors[1][idx])
    return train, test


def unused_training(name: str, limit: int | None):
    """The training-split images ``load_data(name, limit)`` leaves out (never the test set):
    samples of the same distribution a model trained on the subset has not seen, for
    membership checks (``diagnose(heldout=...)``). None when nothing is left out (digits, or
    no ``limit``)."""
    if name == "digits" or not limit:
        return None
    train, _ = data_mod.fashion_mnist()
    idx = _training_order(len(train))[limit:]
    return torch.utils.data.TensorDataset(train.tensors[0][idx], train.tensors[1][idx]) if len(idx) else None


def _training_order(n: int) -> torch.Tensor:
    """The seeded order of the training split whose first ``limit`` images are the subset."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(1234))


def _save(model, codes, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in meta.items()})
    if codes is not None:
        codes.save(path.with_suffix(".codes.safetensors"))


def _load_into(model, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _saved_seconds(path: Path) -> float:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        return float((handle.metadata() or {}).get("seconds", "nan"))


def trained(cache: Path, data: str, model: str, seed: int, train, test, epochs: int, t_mix: float) -> Case:
    """The model trained with codes on ``train`` (cached), as a :class:`Case`."""
    shape, classes = tuple(train.tensors[0].shape[1:]), data_mod.num_classes(train)
    codes = MnemonicCodes.generate(classes, shape, seed=seed)
    case = Case(data, model, seed, epochs, t_mix, cache, None, codes, train, test)
    if case.path().exists():
        case.net = _load_into(build_model(model, shape, classes), case.path())
        return case
    torch.manual_seed(seed)
    net = build_model(model, shape, classes)
    train_with_codes(net, train, codes, t_mix, epochs, seed=seed, progress=True)
    _save(net, codes, case.path(), {"data": data, "model": model, "seed": seed, "epochs": epochs})
    case.net = net.eval()
    return case


def retrained(case: Case, forget_set: list[int]) -> tuple[torch.nn.Module, float]:
    """(the model retrained without ``forget_set``, its training seconds), cached."""
    path = case.path("-retrain-" + "-".join(map(str, forget_set)))
    if path.exists():
        return _load_into(copy.deepcopy(case.net), path), _saved_seconds(path)
    start = time.perf_counter()
    ref = B.retrain(case.net, case.train, forget_set, epochs=case.epochs, codes=case.codes,
                    t_mix=case.t_mix, seed=case.seed, progress=True)
    seconds = time.perf_counter() - start
    _save(ref, None, path, {"seconds": seconds})
    return ref, seconds


def oracle(net, codes, test, forget_set):
    """Best lambda1 on the grid (lambda2 = 10) by *test* accuracy: the largest A_R among the
    points with E_F >= 0.99, else the largest A_R + E_F."""
    best = None
    for l1 in ORACLE_GRID:
        ev = evaluate(forget(net, codes, forget_set, lambda1=l1, lambda2=10.0).model, test, forget_set)
        a_r, e_f = ev.retain_accuracy, 1 - ev.forget_accuracy
        key = (e_f >= 0.99, a_r if e_f >= 0.99 else a_r + e_f)
        if best is None or key > best[0]:
            best = (key, l1)
    return best[1]


def _mnemonic(method, net, codes, train, test, forget_set, seed):
    """The method's ForgetResult for one of the "mnemonic-*" entries."""
    if method == "mnemonic-paper":
        return forget(net, codes, forget_set, lambda1=PAPER_LAMBDAS[0], lambda2=PAPER_LAMBDAS[1])
    if method == "mnemonic-auto":
        return B.mnemonic_result(net, codes, forget_set, lambda1="auto", lambda2=10.0)
    if method == "mnemonic-misclassify":
        return B.mnemonic_result(net, codes, forget_set, lambda1="auto", lambda2=10.0,
                                 depth=0.0, max_forget_prob=1.0)
    if method == "mnemonic-oracle":
        return forget(net, codes, forget_set, lambda1=oracle(net, codes, test, forget_set), lambda2=10.0)
    k = int(method.rsplit("k", 1)[1])
    return B.mnemonic_with_data_result(net, train, forget_set, k=k, seed=seed, lambda1="auto", lambda2=10.0)


def run_method(method, net, codes, train, test, forget_set, seed):
    """(model, seconds, extra info) of one method other than "retrain"."""
    if method == "original":
        return net, 0.0, {}
    if method in DATA_BASELINES:
        fn, options = DATA_BASELINES[method]
        if method in SEEDED:
            options = {**options, "seed": seed}
        return (*M.timed(fn, net, train, forget_set, **options), {})
    if method.startswith("mnemonic"):
        r = _mnemonic(method, net, codes, train, test, forget_set, seed)
        return r.model, r.seconds, {"lambda1": r.lambda1, "lambda2": r.lambda2}
    raise ValueError(f"unknown method {method!r}")


def forget_sets(spec: str, classes: int) -> list[list[int]]:
    if spec == "each":
        return [[c] for c in range(classes)]
    return [[int(c) for c in spec.split(",")]]


def parse_args(argv, parser_class=argparse.ArgumentParser):
    p = parser_class(prog="mnemo-fast experiment", description=__doc__)
    p.add_argument("--data", nargs="+", default=["digits"], choices=data_mod.DATASETS)
    p.add_argument("--models", nargs="+", default=["mlp"], choices=("mlp", "cnn", "resnet"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--forget", nargs="+", default=["0", "each", "0,1"],
                   help='forget sets: "0", "each" (every class in turn), "0,1" (two at once)')
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--each-methods", nargs="+", default=None, choices=METHODS,
                   help="methods for the 'each' sweep (default: all)")
    p.add_argument("--epochs", type=int, help="training epochs (default 40 digits, 10 fashion)")
    p.add_argument("--t-mix", type=float, default=0.1)
    p.add_argument("--limit", type=int, default=10000, help="Fashion-MNIST training subset (0: all)")
    p.add_argument("--cache", type=Path, default=Path("runs/experiment"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/UNLEARNING.md"))
    p.add_argument("--figure", type=Path, default=None, help="default: next to --out, .png")
    p.add_argument("--fresh", action="store_true", help="recompute rows already in results.jsonl")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--report-all", action="store_true",
                   help="build the report from every row in <cache>/results.jsonl, computing nothing")
    return p.parse_args(argv)


def _key(row):
    return (row["data"], row["model"], row["seed"], tuple(row["forget"]), row["method"], row["epochs"])


def _read_rows(results: Path) -> dict:
    """key -> row of every row already in ``results`` (the last one wins)."""
    if not results.exists():
        return {}
    return {_key(row): row for row in map(json.loads, results.read_text().splitlines())}


def _forget_set_rows(case: Case, forget_set: list[int], methods, done: dict, results: Path) -> list[dict]:
    """One row per method for one forget set, computing (and appending) only the missing ones.
    The retrained reference is loaded or trained once, when the first missing row needs it."""
    rows, ref, ref_seconds = [], None, None
    for method in methods:
        key = (case.data, case.model, case.seed, tuple(forget_set), method, case.epochs)
        if key in done:
            rows.append(done[key])
            continue
        if ref is None and "retrain" in methods:
            ref, ref_seconds = retrained(case, forget_set)
        if method == "retrain":
            out, seconds, info = ref, ref_seconds, {}
        else:
            torch.manual_seed(case.seed)
            out, seconds, info = run_method(method, case.net, case.codes, case.train, case.test,
                                            forget_set, case.seed)
        row = {"data": case.data, "model": case.model, "seed": case.seed, "forget": forget_set,
               "method": method, "epochs": case.epochs, "seconds": seconds, **info,
               **M.report(out, case.train, case.test, forget_set, reference=ref, seed=case.seed)}
        row["per_class"] = {str(k): v for k, v in evaluate(out, case.test, forget_set).per_class.items()}
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        done[key] = row
        rows.append(row)
        print(f"{case.data} {case.model} s{case.seed} forget={forget_set} {method:22s} "
              f"A_R {100 * row['A_R']:.1f} E_F {100 * row['E_F']:.1f} "
              f"MIA {row['mia_auc']:.2f} {seconds:.3f}s", flush=True)
    return rows


def run(args) -> list[dict]:
    """Every asked-for row: read from ``<cache>/results.jsonl`` or computed and appended."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    results = args.cache / "results.jsonl"
    done = {} if args.fresh else _read_rows(results)
    rows = []
    for data in args.data:
        train, test = load_data(data, args.limit if data == "fashion-mnist" else None)
        epochs = args.epochs or EPOCHS[data]
        for model_name, seed in itertools.product(args.models, args.seeds):
            case = trained(args.cache, data, model_name, seed, train, test, epochs, args.t_mix)
            for spec in args.forget:
                methods = args.each_methods if spec == "each" and args.each_methods else args.methods
                for forget_set in forget_sets(spec, data_mod.num_classes(train)):
                    rows += _forget_set_rows(case, forget_set, methods, done, results)
    return rows


def _ms(values, scale=100.0, digits=1):
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if len(v) == 0:
        return "-"
    v = v * scale
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def _setting(fs) -> str:
    return f"classes {','.join(map(str, fs))}" if len(fs) > 1 else "one class"


def tables(rows: list[dict]) -> str:
    out = []
    groups = {}
    for r in rows:
        kind = "class 0" if r["forget"] == [0] else ("two classes " + ",".join(map(str, r["forget"])) if len(r["forget"]) > 1 else "each class")
        groups.setdefault((r["data"], r["model"], kind), []).append(r)
    # a class-0 row is also part of "each class"
    for (d, m, kind), rs in list(groups.items()):
        if kind == "class 0":
            groups.setdefault((d, m, "each class"), [])
            each = groups[(d, m, "each class")]
            if each:
                wanted = {r["method"] for r in each}
                each.extend(r for r in rs if r["method"] in wanted)
    order = {"class 0": 0, "each class": 1}
    for (d, m, kind) in sorted(groups, key=lambda k: (k[0], k[1], order.get(k[2], 2))):
        rs = groups[(d, m, kind)]
        if not rs:
            continue
        seeds = sorted({r["seed"] for r in rs})
        n_sets = len({tuple(r["forget"]) for r in rs})
        out.append(f"\n### {d} / {m} / forget {kind} (seeds {seeds}, {n_sets} forget set(s); mean ± std over them)\n")
        out.append("| method | A_R % | E_F % | A_R train % | MIA AUC (loss) | member rate % | agree w/ retrain (forget) % | JS to retrain (forget) | agree w/ retrain (retain) % | seconds | n |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for method in METHODS:
            sel = [r for r in rs if r["method"] == method]
            if not sel:
                continue
            out.append(
                f"| {method} | {_ms([r['A_R'] for r in sel])} | {_ms([r['E_F'] for r in sel])} | "
                f"{_ms([r['A_R_train'] for r in sel])} | {_ms([r['mia_auc'] for r in sel], 1, 3)} | "
                f"{_ms([r['member_rate'] for r in sel])} | {_ms([r.get('agree_forget') for r in sel])} | "
                f"{_ms([r.get('js_forget') for r in sel], 1, 3)} | {_ms([r.get('agree_retain') for r in sel])} | "
                f"{_ms([r['seconds'] for r in sel], 1, 3)} | {len(sel)} |")
    return "\n".join(out)


def calibration_table(rows: list[dict]) -> str:
    """auto (codes only) vs the test-set oracle, per (data, model), over every class and seed."""
    out = ["\n| data / model | criterion | cases | log10(λ1 auto / λ1 oracle) mean ± std | "
           "A_R auto − oracle (points) | E_F = 100 (auto) | E_F = 100 (oracle) | A_R within 1 pt of oracle & E_F ≥ 99 |",
           "|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        if len(r["forget"]) == 1:
            by.setdefault((r["data"], r["model"]), {}).setdefault((r["seed"], r["forget"][0]), {})[r["method"]] = r
    for (d, m), cases in sorted(by.items()):
        for method in ("mnemonic-auto", "mnemonic-misclassify", "mnemonic-paper"):
            pairs = [(c[method], c["mnemonic-oracle"]) for c in cases.values()
                     if method in c and "mnemonic-oracle" in c]
            if not pairs:
                continue
            logs = [math.log10(a["lambda1"] / o["lambda1"]) for a, o in pairs]
            diff = [a["A_R"] - o["A_R"] for a, o in pairs]
            ok = sum(1 for a, o in pairs if a["E_F"] >= 0.99 and a["A_R"] >= o["A_R"] - 0.01)
            out.append(
                f"| {d} / {m} | {method} | {len(pairs)} | {_ms(logs, 1, 2)} | {_ms(diff, 100, 2)} | "
                f"{sum(a['E_F'] >= 0.999 for a, _ in pairs)}/{len(pairs)} | "
                f"{sum(o['E_F'] >= 0.999 for _, o in pairs)}/{len(pairs)} | {ok}/{len(pairs)} |")
    return "\n".join(out)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["data"], r["model"]) for r in rows if r["forget"] == [0]})
    if not combos:
        return
    fig, axes = plt.subplots(len(combos), 2, figsize=(11, 3.6 * len(combos)), squeeze=False)
    colors = plt.get_cmap("tab20")
    for i, (d, m) in enumerate(combos):
        rs = [r for r in rows if r["data"] == d and r["model"] == m and r["forget"] == [0]]
        for j, method in enumerate(METHODS):
            sel = [r for r in rs if r["method"] == method]
            if not sel:
                continue
            a_r = 100 * np.mean([r["A_R"] for r in sel])
            e_f = 100 * np.mean([r["E_F"] for r in sel])
            sec = max(np.mean([r["seconds"] for r in sel]), 1e-4)
            axes[i, 0].scatter(e_f, a_r, color=colors(j), label=method, s=40)
            axes[i, 1].scatter(sec, a_r, color=colors(j), label=method, s=40)
        axes[i, 0].set(xlabel="E_F (%)", ylabel="A_R (%)", title=f"{d} / {m}: forget class 0")
        axes[i, 1].set(xlabel="forgetting wall time (s, log)", ylabel="A_R (%)", xscale="log",
                       title=f"{d} / {m}: A_R vs time")
    axes[0, 1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None, parser_class=argparse.ArgumentParser) -> int:
    args = parse_args(argv, parser_class)
    if args.report_all:
        rows = list(_read_rows(args.cache / "results.jsonl").values())
    else:
        rows = run(args)
    fig_path = args.figure or args.out.with_suffix(".png")
    figure(rows, fig_path)
    report = ["## Results (generated by `mnemo-fast experiment`)", tables(rows),
              "\n## Lambda calibration from the codes vs the test-set oracle", calibration_table(rows)]
    generated = args.out.with_suffix(".generated.md")
    generated.write_text("\n".join(report) + "\n")
    print(f"wrote {generated} and {fig_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

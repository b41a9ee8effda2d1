"""Issue 26, item 4: extensions of the paper's step, tried on the zoo's TUNE half only.

Each variant forgets one class of a cached zoo model (benchmarks/zoo.py trains and caches them)
and is judged as the zoo judges (F <= 1% and A_R within 2 points on the test set; the flag from
the same verdict as ``forget``'s, :func:`mnemo_fast.verdict.judge`):

  shift            ``mf.forget(..., lambda1="auto")`` (the package's default; the baseline)
  shift-nonorm     the same with ``params=`` leaving out normalisation and embedding parameters
  shift-layer      the same with ``calibration={"blocks": "layer"}`` (per-layer steps)
  (the study that chose mode="dampen"'s defaults: every threshold's test scores are recorded with
  ``--curve``, never used to choose; the library's forget(mode="dampen") is measured by zoo.py)
  dampen           SSD-style dampening from the CODE Fisher: every element with f_F > a * f_R is
                   scaled by min(f_R / f_F, 1) (Foster et al., AAAI 2024, with the code Fisher in
                   place of the training data's), a chosen per case as the largest threshold of a
                   grid whose result the criterion calls clean (on the codes, and on the sample
                   where one is given)
  dampen-nonorm    the same, leaving out normalisation and embedding parameters
  (``--floor K``)  either dampening with each remaining-Fisher element raised to at least K times
                   its tensor's mean (the ratio's denominator shrunk towards the tensor's level;
                   the setting's name gains "-floorK")

Settings: ``codes`` (the codes alone) and ``val256`` (256 held-out rows of every class, as
zoo.py). Rows go to ``--rows`` (jsonl; the last row of a key wins), read by ``--report``.

    nice -n 19 python benchmarks/zoo_extensions.py --data digits keywords --variants dampen
    python benchmarks/zoo_extensions.py --report
    python benchmarks/zoo_extensions.py --rules benchmarks/zoo-study/dampen-curves.jsonl.gz
    python benchmarks/zoo_extensions.py --rules benchmarks/zoo-study/dampen-curves-retain-figures.jsonl.gz

``--rules`` also prints the confirmation's bounds (val256) and the codes-alone retain margins,
each judged as ``forget`` judges (mnemo_fast/calibration/dampen.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import mnemo_fast as mf  # noqa: E402
import zoo  # noqa: E402
from mnemo_fast import verdict as verdicts  # noqa: E402
from mnemo_fast.calibration import Criterion  # noqa: E402
from mnemo_fast.calibration.dampen import default_params  # noqa: E402
from mnemo_fast.evaluation.accuracy import predictions  # noqa: E402
from mnemo_fast.modeling import logits_of  # noqa: E402
from mnemo_fast.reference import perturb  # noqa: E402
from mnemo_fast.session import code_inputs  # noqa: E402

VARIANTS = ("shift", "shift-nonorm", "shift-layer", "dampen", "dampen-nonorm")
SETTINGS = ("codes", "val256")
DEFAULT_ROWS = HERE / "zoo-study" / "extensions.jsonl"
#: dampening thresholds a (f_F > a f_R is dampened), tried from the largest (fewest elements) down
THRESHOLDS = tuple(10.0 ** (k / 4) for k in range(32, -1, -1))  # 1e8 ... 1, four a decade
#: the library's default for mode="dampen" (normalisation and embedding parameters left out)
no_norm_selector = default_params


@torch.no_grad()
def logits_on(model, x, chunk: int = 512):
    return torch.cat([logits_of(model(x[i:i + chunk])) for i in range(0, len(x), chunk)])


def floored(f_remain: dict, floor: float) -> dict:
    """The remaining Fisher with each tensor's elements raised to at least ``floor`` times the
    tensor's mean (a shrinkage of the ratio's denominator: an element the few retained codes
    barely use is not taken as unused by the real data). ``floor`` 0: unchanged."""
    if not floor:
        return f_remain
    return {n: torch.clamp(f, min=float(floor * f.double().mean())) for n, f in f_remain.items()}


@torch.no_grad()
def dampen_case(model, codes, c: int, retain=None, selector=None, test=None, lam: float = 1.0,
                floor: float = 0.0, iterate: bool = False) -> dict:
    """SSD-style dampening from the code Fisher, threshold chosen on the criterion; the model is
    restored before returning a dampened copy's test predictions (as ``forget`` returns a copy)."""
    import copy
    start = time.perf_counter()
    net = copy.deepcopy(model).eval()
    with torch.enable_grad():
        f_forget, f_remain = mf.class_fishers(net, codes, [c], params=selector)
    f_remain = floored(f_remain, floor)
    params = dict(net.named_parameters())
    names = list(f_forget)
    saved = {n: params[n].detach().clone() for n in names}
    x, labels = code_inputs(net, codes, range(codes.num_classes))
    is_forget = labels == c
    before = logits_on(net, x)
    sample_before = None
    if retain is not None:
        sample_before = logits_on(net, retain[0])
    def apply(a):  # the reference's formula (mnemo_fast.reference.perturb.dampening), from the saved values
        if iterate:  # cumulative: the Fisher pair of the model as it is now, dampened from where it is
            with torch.enable_grad():
                now_forget, now_remain = mf.class_fishers(net, codes, [c], params=selector)
            for n in names:
                factor = perturb.dampening(now_forget[n], now_remain[n], a, lam)
                params[n].mul_(factor.to(params[n].dtype))
            return
        for n in names:
            factor = perturb.dampening(f_forget[n], f_remain[n], a, lam)
            params[n].copy_(saved[n] * factor.to(saved[n].dtype))

    def judged(a):
        apply(a)
        sample = None
        if retain is not None:
            sample = verdicts.sample_accuracy(sample_before, logits_on(net, retain[0]), retain[1], [c])
        v = verdicts.judge(before, logits_on(net, x), labels, is_forget, criterion=criterion, sample=sample)
        return v, v.forget_ok

    # smaller thresholds dampen more elements: the first (largest) one that meets the forget side
    # is the least damage that forgets; the retain side only worsens below it
    criterion = Criterion()
    chosen, tried, curve = THRESHOLDS[-1], 0, []
    for a in THRESHOLDS:
        tried += 1
        verdict, forget_met = judged(a)
        if test is not None:  # the study's curve: what each threshold does (never used to choose)
            p, t = predictions(net, test)
            a_r, f = zoo.scores(p, t, c)
            point = {"a": a, "A_R": a_r, "F": f, "flagged": verdict.flagged, "forget_met": forget_met,
                     "codes": {k: float(v) for k, v in verdict.details.items()}}
            if verdict.sample is not None:
                point["sample"] = {k: getattr(verdict.sample, k) for k in (
                    "retain_before", "retain_after", "retain_drop_se", "forget_after", "forget_rows")}
            curve.append(point)
        elif forget_met:
            chosen = a
            break
    if test is not None and not iterate:  # iterated: the net stays at the last threshold (the curve is the study)
        met = [pt["a"] for pt in curve if pt["forget_met"]]
        chosen = met[0] if met else THRESHOLDS[-1]
        verdict, forget_met = judged(chosen)
    seconds = time.perf_counter() - start
    dampened = sum(int((perturb.raw_ratio(f_forget[n], f_remain[n]) > chosen).sum()) for n in names)
    return {"net": net, "seconds": seconds, "threshold": chosen, "flagged": verdict.flagged,
            "reasons": list(verdict.reasons), "thresholds_tried": tried, "dampened": dampened,
            "elements": sum(f_forget[n].numel() for n in names), "curve": curve}


def shift_case(model, codes, c: int, retain=None, selector=None, calibration=None) -> dict:
    kwargs = {"retain": retain} if retain is not None else {}
    if selector is not None:
        kwargs["params"] = selector
    if calibration:
        kwargs["calibration"] = calibration
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        result = mf.forget(model, codes, [c], lambda1="auto", **kwargs)
    return {"net": result.model, "seconds": time.perf_counter() - start, "flagged": result.flagged,
            "reasons": list(result.verdict.reasons), "lambda1": result.lambda1}


def run(args) -> int:
    torch.set_num_threads(args.threads)
    done = zoo.load_rows(args.rows) if args.rows.exists() else {}
    ns = argparse.Namespace(half=["tune"], archs=args.archs, recipes=None, data=args.data, seeds=args.seeds,
                            classes=args.classes, settings=["codes"])
    todo = [t for t in zoo.plan(ns)]
    datasets, model_key = {}, None
    args.rows.parent.mkdir(parents=True, exist_ok=True)
    for seed, arch, recipe, data, c, _ in zoo.tqdm(todo, desc="extensions", mininterval=30, file=sys.stderr):
        if data not in datasets:
            datasets[data] = zoo.load_data(data, args.limit)
        d = datasets[data]
        key = (arch, recipe, data, seed)
        if key != model_key:
            model, codes, meta = zoo.trained(args.cache, arch, recipe, data, seed, d, None, args.limit)
            pred, true = predictions(model, d["test"])
            model_key, selector = key, no_norm_selector(model)
        a_r0, f0 = zoo.scores(pred, true, c)
        for setting in args.settings:
            retain = None
            if setting == "val256":
                retain = zoo.retain_sample(d["heldout"], c, 256, seed, every_class=True)
            for variant in args.variants:
                name = (f"{setting}/{variant}" + (f"-floor{args.floor:g}" if args.floor else "")
                        + ("-iterated" if args.iterate else ""))
                if (arch, recipe, data, seed, c, name) in done:
                    continue
                torch.manual_seed(seed)
                nonorm = selector if variant.endswith("nonorm") else None
                if variant.startswith("dampen"):
                    out = dampen_case(model, codes, c, retain, nonorm, d["test"] if args.curve else None, args.lam,
                                      args.floor, args.iterate)
                else:
                    out = shift_case(model, codes, c, retain, nonorm,
                                     {"blocks": "layer"} if variant == "shift-layer" else None)
                p, t = predictions(out.pop("net"), d["test"])
                a_r, f = zoo.scores(p, t, c)
                row = {"arch": arch, "recipe": recipe, "data": data, "seed": seed, "class": c,
                       "setting": name, "A_R_before": a_r0, "F_before": f0, "A_R": a_r, "F": f,
                       **out}
                with args.rows.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    return 0


def report(args) -> int:
    rows = list(zoo.load_rows(args.rows).values())
    by = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    print("| setting / variant | cases | forgotten | silent failures | flagged failures | false alarms | mean A_R change |")
    print("|---|---|---|---|---|---|---|")
    for setting in sorted(by):
        t = zoo.tally(by[setting])
        print(f"| {setting} | {t['cases']} | {t['forgotten']} | {t['silent failure']} | {t['flagged failure']} | "
              f"{t['false alarm']} | {t['dA']:+.1f} |")
    archs = sorted({r["arch"] for r in rows})
    print()
    print("| setting / variant | " + " | ".join(archs) + " |")
    print("|---|" + "---|" * len(archs))
    for setting in sorted(by):
        cells = []
        for a in archs:
            sub = [r for r in by[setting] if r["arch"] == a]
            cells.append(f"{sum(zoo.forgotten(r) for r in sub)}/{len(sub)}" if sub else "-")
        print(f"| {setting} | " + " | ".join(cells) + " |")
    return 0


def _ok(point: dict, row: dict) -> bool:
    return point["F"] <= 0.01 and point["A_R"] >= row["A_R_before"] - 0.02


def _codes_rule(depth: float, max_prob: float):
    return lambda p: (p["codes"]["forget_codes_still_right"] == 0 and p["codes"]["forget_depth"] >= depth
                      and p["codes"]["forget_max_prob"] <= max_prob)


def _sample_rule(p) -> bool:
    return p["sample"]["forget_after"] <= 0.01 and p["codes"]["forget_codes_still_right"] == 0


def _retain_codes(margin: float):
    return lambda p: p["codes"]["retain_codes_lost"] == 0 and p["codes"]["retain_margin_ratio"] >= margin


def _retain_sample(p) -> bool:
    s = p["sample"]
    return (s["retain_before"] - s["retain_after"]) + verdicts.RETAIN_DROP_Z * s["retain_drop_se"] <= 0.02


#: the selection rules compared on the curves: (forget side, retain side judged for the flag)
RULES = {
    **{f"codes depth {d:g}, prob {p:g}, margin {m:g}": (_codes_rule(d, p), _retain_codes(m))
       for d, p, m in ((1.0, 1e-3, 0.5), (0.5, 1e-2, 0.5), (0.25, 1e-2, 0.5), (0.25, 1e-2, 0.7), (0.25, 0.1, 0.5),
                       (0.0, 1.0, 0.5))},
    "sample's forget rows <= 1%, codes misclassified": (_sample_rule, _retain_sample),
}


def _margin_choice(curve: list, forget_side, notches: int) -> tuple[int, int | None]:
    """(index of the point applied, index of the first meeting ``forget_side`` or None): the
    first such point plus ``notches``, or the last point where none meets it."""
    first = next((k for k, p in enumerate(curve) if forget_side(p)), None)
    return (len(curve) - 1 if first is None else min(first + notches, len(curve) - 1)), first


def _tally(sub: list, choose) -> tuple[int, int, int]:
    """(forgotten, silent failures, false alarms) of the rows ``sub`` where ``choose(row)`` gives
    (index of the curve point applied, flagged)."""
    forgotten = silent = false = 0
    for r in sub:
        k, flagged = choose(r)
        good = _ok(r["curve"][k], r)
        forgotten += good
        silent += not good and not flagged
        false += good and flagged
    return forgotten, silent, false


def rules_report(path: Path) -> int:
    """The threshold rules on recorded curves (``--curve`` rows, e.g. benchmarks/zoo-study/
    dampen-curves.jsonl.gz): per rule and margin notches, forgotten / silent / false alarms."""
    import gzip
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    print("| variant | rule | notches | cases | forgotten | silent failures | false alarms | oracle |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in sorted({r["setting"] for r in rows}):
        sub = [r for r in rows if r["setting"] == variant]
        oracle = sum(any(_ok(p, r) for p in r["curve"]) for r in sub)
        for name, (forget_side, retain_side) in RULES.items():
            for notches in (0, 1, 2):
                def choose(r, forget_side=forget_side, retain_side=retain_side, notches=notches):
                    k, first = _margin_choice(r["curve"], forget_side, notches)
                    return k, first is None or not retain_side(r["curve"][k])
                forgotten, silent, false = _tally(sub, choose)
                print(f"| {variant} | {name} | {notches} | {len(sub)} | {forgotten} | {silent} | {false} | {oracle} |")
    _confirmation_report(rows)
    _retain_margin_report(rows)
    return 0


def _confirmed(curve: list, confirm) -> tuple[int, bool]:
    """mode="dampen"'s choice with a validation split (mnemo_fast/calibration/dampen.py): stop on
    the sample's rule plus one notch, then, where ``confirm`` (a forget side) fails there, go on
    down while the sample's retained rows hold, to the first point that meets it. (index, flagged)."""
    k, first = _margin_choice(curve, _sample_rule, 1)
    if first is None:
        return k, True
    if not (confirm(curve[k]) and _retain_sample(curve[k])):
        for j in range(k + 1, len(curve)):
            if not _retain_sample(curve[j]):
                break
            if confirm(curve[j]):
                return j, False
    return k, not (confirm(curve[k]) and _retain_sample(curve[k]))


def _confirmation_report(rows: list) -> None:
    """The confirmation's bound on the codes, compared on the curves (val256 variants only)."""
    print("\n| variant | confirmation (codes' forget side) | cases | forgotten | silent failures | false alarms |")
    print("|---|---|---|---|---|---|")
    for variant in sorted({r["setting"] for r in rows if r["setting"].startswith("val")}):
        sub = [r for r in rows if r["setting"] == variant]
        for name, confirm in (("none", lambda p: _sample_rule(p)),
                              *((f"depth 0.25, prob {q:g}", lambda p, q=q: _sample_rule(p) and _codes_rule(0.25, q)(p))
                                for q in (0.05, 0.02, 0.01))):
            forgotten, silent, false = _tally(sub, lambda r, confirm=confirm: _confirmed(r["curve"], confirm))
            print(f"| {variant} | {name} | {len(sub)} | {forgotten} | {silent} | {false} |")


def _retain_margin_report(rows: list) -> None:
    """The codes-alone choice (depth 0.25, prob 1e-2, one notch) judged as the verdict judges it
    (both sides at the step applied) with each retain margin."""
    print("\n| variant | codes alone: min_retain_margin | cases | forgotten | silent failures | false alarms |")
    print("|---|---|---|---|---|---|")
    forget_side = _codes_rule(0.25, 1e-2)
    for variant in sorted({r["setting"] for r in rows}):
        sub = [r for r in rows if r["setting"] == variant]
        for margin in (0.5, 0.7, 0.8, 0.9, 0.95):
            def choose(r, retain_side=_retain_codes(margin)):
                k, first = _margin_choice(r["curve"], forget_side, 1)
                point = r["curve"][k]
                return k, first is None or not (forget_side(point) and retain_side(point))
            forgotten, silent, false = _tally(sub, choose)
            print(f"| {variant} | {margin:g} | {len(sub)} | {forgotten} | {silent} | {false} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=None)
    p.add_argument("--data", nargs="+", default=["digits", "keywords"], choices=zoo.DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=list(zoo.SEEDS))
    p.add_argument("--classes", nargs="+", type=int, default=None)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--cache", type=Path, default=zoo.DEFAULT_CACHE)
    p.add_argument("--rows", type=Path, default=DEFAULT_ROWS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lam", type=float, default=1.0, help="dampen: SSD's lambda (min(lam / eta, 1))")
    p.add_argument("--floor", type=float, default=0.0,
                   help="dampen: raise each remaining-Fisher element to at least this times its tensor's mean")
    p.add_argument("--iterate", action="store_true",
                   help="dampen, with --curve: each threshold dampens the model left by the last, from its own Fisher")
    p.add_argument("--curve", action="store_true", help="dampen: record every threshold's test scores (a study)")
    p.add_argument("--report", action="store_true")
    p.add_argument("--rules", type=Path, default=None, metavar="CURVES",
                   help="compare the threshold rules on recorded curves (jsonl or jsonl.gz), compute nothing")
    args = p.parse_args(argv)
    if args.rules is not None:
        return rules_report(args.rules)
    return report(args) if args.report else run(args)


if __name__ == "__main__":
    raise SystemExit(main())

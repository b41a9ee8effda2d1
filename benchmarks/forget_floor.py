"""How close can a whole ``forget`` come to a plain forward+backward at C = 10? (issue 9)

Run: python benchmarks/forget_floor.py [--classes 10] [--rounds 300]

Times three things on the forget section's MLP (784-1000-C, sigmoid; one code per class), in
one process, one thread, interleaved round by round so that a disturbance hits all three:

- ``plain``: one forward+backward of all codes with parameter gradients (the target's unit);
- ``floor``: the method's own work written out by hand for this one model, with the package's
  compiled kernels and nothing else: a copy of the parameters to edit, one forward of all
  codes with the first layer's output as a leaf, one backward to the two layers' outputs, the
  four (g^2)^T (x^2) sums of the Fisher pair and the bias sums, the epsilon floor and the
  class count, the per-tensor maximum ratio, then both signs' candidates (shift, one scoring
  forward, argmax statistics) and the undo in between. No input check, no probe, no plan,
  no hooks, no Python structure around it: what no general implementation can go below;
- ``forget``: ``mnemo_fast.forget(model, codes, [0], lambda1=1e-3, lambda2=10)``.

Prints the minimum and the median of each and the ratios to ``plain``. ``--order
interleaved`` (default) runs plain, floor, forget in turn, so each call finds the caches as
the other two left them (a one-off call in a job); ``--order blocked`` runs each in its own
consecutive block (each call finds its own working set warm: what repeated timing of one
function measures, and what benchmarks/run.py's forget section reports).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mnemo_fast  # noqa: E402
from mnemo_fast.codes import MnemonicCodes  # noqa: E402
from mnemo_fast.evaluation.models import MLP  # noqa: E402
from mnemo_fast.fast import _ext  # noqa: E402


def problem(classes: int) -> tuple[torch.nn.Module, dict]:
    """(model, {"plain", "floor", "forget"}): one model, which none of them changes, and the
    three timed callables on it and its codes.
    ``floor()`` returns the parameters after both candidates (the -1 one applied, as the
    method leaves them when -1 wins); ``forget()`` returns the ForgetResult."""
    ops = torch.ops.mnemo_fast
    c = classes
    torch.manual_seed(0)
    model = MLP((1, 28, 28), c).eval()
    codes = MnemonicCodes.generate(c, (1, 28, 28))
    x, y = codes.batch(range(c))
    flat = x.view(c, -1)
    params = [p.detach() for p in model.parameters()]  # W1 [1000, 784], b1, W2 [C, 1000], b2

    def plain() -> None:
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(model(x), y, reduction="sum").backward()

    def floor() -> list[torch.Tensor]:
        live = [p.clone() for p in params]
        hidden = F.linear(flat, params[0], params[1]).requires_grad_()
        act = torch.sigmoid(hidden)
        logits = F.linear(act, params[2], params[3])
        g1, g2 = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), [hidden, logits])
        act = act.detach()
        pair = []
        for rows, count in ((slice(0, 1), 1), (slice(1, c), c - 1)):
            sums = [torch.mm(g1[rows].square().t(), flat[rows].square()), g1[rows].square().sum(0),
                    torch.mm(g2[rows].square().t(), act[rows].square()), g2[rows].square().sum(0)]
            for s in sums:
                s.add_(1e-16)
                if count != 1:
                    s.div_(count)
            pair.append(sums)
        ratio = ops.perturb_max_ratio(pair[0], pair[1])
        stats = []
        for sign in (1.0, -1.0):
            ops.perturb_shift_(live, pair[0], pair[1], ratio, 1e-3, 10.0, sign)
            with torch.no_grad():
                out = F.linear(torch.sigmoid(F.linear(flat, live[0], live[1])), live[2], live[3])
            hit = (out.argmax(-1) == y).float()
            stats.append(torch.stack([hit[0], hit[1:].mean()]).tolist())
            if sign == 1.0:
                torch._foreach_copy_(live, params)
        return live

    def forget():
        return mnemo_fast.forget(model, codes, [0], lambda1=1e-3, lambda2=10.0)

    return model, {"plain": plain, "floor": floor, "forget": forget}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--order", choices=("interleaved", "blocked"), default="interleaved")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not _ext.available():
        raise SystemExit("the compiled extension is not built: the floor uses its kernels")
    c = args.classes
    _, runs = problem(c)
    times = {name: [] for name in runs}
    for _ in range(10):
        for fn in runs.values():
            fn()
    schedule = ([list(runs)] * args.rounds if args.order == "interleaved"
                else [[name] * args.rounds for name in runs])
    for names in schedule:
        for name in names:
            start = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    base_min, base_med = min(times["plain"]), statistics.median(times["plain"])
    print(f"C = {c}, {args.rounds} calls each, {args.order}, one thread, torch {torch.__version__}")
    print("| what | min ms | median ms | min / plain min | median / plain median |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        lo, med = min(t), statistics.median(t)
        print(f"| {name} | {lo:.3f} | {med:.3f} | {lo / base_min:.2f}x | {med / base_med:.2f}x |")


if __name__ == "__main__":
    main()

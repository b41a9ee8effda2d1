"""Two gloo processes give the one-process Fisher and forgotten model (mnemo_fast.distributed)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mnemo_fast as mf
import mnemo_fast.reference
from mnemo_fast.reference import perturb
from mnemo_fast.evaluation import models
from mnemo_fast.distributed.launch import shard
from mnemo_fast.sharding import gathered
from mnemo_fast.validation import UnlearningError
import models_zoo as zoo
from rounding import float32_fisher_bound, float32_model_bound
from mnemo_fast.distributed import DistributedEngine, RankDisagreement, forget_distributed, share
from mnemo_fast.session import correct_predictions
from mnemo_fast.training.train import train

WORLD = 2
CASES = {
    "k1-shift": dict(per_class=1, mode="shift", ddp=False),  # 1 forget code: rank 1 has none
    "k3-shift": dict(per_class=3, mode="shift", ddp=False),  # 3 and 27 codes: uneven split
    "k3-shift-ddp": dict(per_class=3, mode="shift", ddp=True),
    "k2-gaussian": dict(per_class=2, mode="gaussian", ddp=False),
    "k3-shift-f64": dict(per_class=3, mode="shift", ddp=False, dtype=torch.float64),
    # the dampening's threshold compares a ratio of sums: in float64 the two ranks' order of
    # summation cannot move an element across it
    "k3-dampen-f64": dict(per_class=3, mode="dampen", ddp=False, dtype=torch.float64),
}
# Two ranks add the same squares in another order, each over its own batches. float64 shows
# the split itself is exact (1e-13). In float32 the bound is what that reordering can produce
# (tests/rounding.py), not a figure from one run: a fixed 4e-6 once failed a clean run at
# 4.73e-6.
EXACT = dict(fisher=1e-13, model=1e-13)
FORGET = [0]
# FSDP2 (fully_shard, DTensor parameters): each Linear/Conv2d its own unit, the rest (BatchNorm,
# LayerNorm) in the root unit. Odd sizes give uneven shards (hidden 33: 17 and 16 rows).
FSDP_CASES = {
    # one code per class: the forget class's single code leaves rank 1 without codes, and the
    # 9 remaining codes in steps of 4 leave it a step short (both run a discarded stand-in)
    "fsdp-mlp": dict(build=lambda: models.MLP((1, 8, 8), 10, hidden=33), shape=(1, 8, 8), params=None, per_class=1),
    "fsdp-cnn": dict(build=lambda: models.SmallCNN((1, 8, 8), 10, width=5), shape=(1, 8, 8), params=None),
    # The class token and position embedding are raw parameters, which no rule takes: left
    # out. So is qkv.bias: its key third has exactly zero gradient (softmax ignores a shift of
    # every score), so its Fisher is eps plus roundoff and its ratio differs with the order of
    # summation (6.6% between chunk sizes 4 and 30 in one process); shifting it changes nothing.
    "fsdp-vit": dict(build=lambda: zoo.TinyViT(num_classes=10), shape=(3, 8, 8),
                     params=["patch.*", "norm*", "qkv.weight", "proj.*", "mlp.*", "head.*"]),
    # nn.MultiheadAttention inside a TransformerEncoderLayer, the layer one FSDP unit (in_proj_bias
    # holds the key bias: left out, as qkv.bias above)
    "fsdp-mha": dict(build=lambda: _PatchEncoder(), shape=(3, 8, 8), params=lambda name: not name.endswith("in_proj_bias"),
                     units=(torch.nn.TransformerEncoderLayer,)),
    # Parameters taken at the operation level on shards (FSDP2 gathers them for the forward):
    # a text model (GPT-2-style Conv1D weights and biases through addmm, RMSNorm scales, a
    # layer scale, a hand-added bias, a division by a raw parameter) on token codes, and a
    # Swin-like one (windows folded into the rows, a relative-position table indexed by a
    # buffer, a channels-first F.layer_norm). qkv.bias left out as above.
    "fsdp-text": dict(build=lambda: zoo.TextBlock(classes=10), shape="tokens", params=None, per_class=2),
    "fsdp-windows": dict(build=lambda: zoo.WindowBlock(classes=10), shape=(3, 4, 4),
                         params=lambda name: name != "qkv.bias", per_class=2),
}
FSDP_FORGET = dict(lambda1=1e-1, lambda2=10.0, chunk_size=4)
# lambda1="auto" with per-block steps by top-level module (mnemo_fast.calibration.blocks)
AUTO_BLOCKS = dict(lambda1="auto", lambda2=10.0, chunk_size=4, calibration={"blocks": "module"})


class _PatchEncoder(torch.nn.Module):
    """Patch Conv2d -> one TransformerEncoderLayer (nn.MultiheadAttention) -> mean -> head."""

    def __init__(self, dim: int = 8, num_classes: int = 10):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, dim, 4, stride=4)
        self.layer = torch.nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.layer(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def _fsdp_problem(case_id: str, dtype: torch.dtype = torch.float64):
    """The model and codes of an FSDP case, in float64 by default: the sharded and the one-process
    runs must then agree to 1e-13, and a real difference cannot hide in float32 roundoff."""
    case = FSDP_CASES[case_id]
    torch.manual_seed(0)
    model = case["build"]()
    if case["shape"] == "tokens":
        codes = mf.MnemonicCodes.generate_tokens(10, 6, 20, per_class=case.get("per_class", 3), seed=1)
    else:
        codes = mf.MnemonicCodes.generate(10, case["shape"], per_class=case.get("per_class", 3), seed=1)
    return model.to(dtype), codes.to(dtype)


def _blocks_problem():
    """The small CNN of "fsdp-cnn" after 50 full-batch Adam steps on its own codes
    (:func:`mnemo_fast.training.train.train`), so that it knows them (an untrained model misclassifies
    most retained codes before any step, and the calibration then applies only its smallest
    best-effort step, with nothing for the block search to rescale). One thread while
    training: every process gets the same weights. Returned in float64: on this trained model
    float32 roundoff alone, from another order of the Fisher sums, moves the calibrated model
    by up to 4e-6 of a tensor's largest weight (measured with one process and other chunk
    sizes), which would hide a real difference; in float64 the split must be exact."""
    model, codes = _fsdp_problem("fsdp-cnn", torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        data = torch.utils.data.TensorDataset(*codes.batch(range(codes.num_classes)))
        train(model, data, 50, lr=1e-2, batch_size=len(data), cosine=False)
    finally:
        torch.set_num_threads(threads)
    return model.eval().double(), codes.to(torch.float64)


def _fully_shard(model: torch.nn.Module, *units: tuple[type, ...]) -> torch.nn.Module:
    return shard(model, torch.device("cpu"), *units)


def _full(tensors: dict) -> dict:
    return {name: t.clone() for name, t in gathered(tensors).items()}


def _fsdp_runs(rank: int) -> dict:
    results = {}
    for case_id, case in FSDP_CASES.items():
        model, codes = _fsdp_problem(case_id)
        model = _fully_shard(model, *[case["units"]] if "units" in case else [])
        fisher_f, fisher_r = mf.class_fishers(model, codes, FORGET, engine=DistributedEngine(), params=case["params"], chunk_size=4)
        local_shapes = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
        result = forget_distributed(model, codes, FORGET, inplace=True, params=case["params"], **FSDP_FORGET)
        results[case_id] = {
            "fisher_f": _full(fisher_f), "fisher_r": _full(fisher_r), "local_shapes": local_shapes,
            "model": _full(dict(model.named_parameters())), "scores": result.candidate_scores,
            "same_object": result.model is model,
        }
    # lambda1="auto" with the global step alone: the calibration's probes perturb the shards and score the codes
    model, codes = _blocks_problem()
    model = _fully_shard(model)
    result = forget_distributed(model, codes, FORGET, inplace=True, lambda1="auto", lambda2=10.0, chunk_size=4,
                                calibration={"blocks": False})
    results["fsdp-auto"] = {"lambda1": result.lambda1, "model": _full(dict(model.named_parameters()))}
    # per-block steps (calibration={"blocks": "module"}): the block search scores on the shards too
    model, codes = _blocks_problem()
    model = _fully_shard(model)
    result = forget_distributed(model, codes, FORGET, inplace=True, **AUTO_BLOCKS)
    results["fsdp-auto-blocks"] = _blocks_run(result, _full(dict(model.named_parameters())))
    # Gaussian on shards: every rank draws its own shard's noise, so only the mask is compared.
    model, codes = _fsdp_problem("fsdp-mlp")
    model = _fully_shard(model)
    forget_distributed(model, codes, FORGET, inplace=True, mode="gaussian", draws=1, tau=0.5,
                       generator=torch.Generator().manual_seed(3), **FSDP_FORGET)
    results["fsdp-gaussian"] = _full(dict(model.named_parameters()))
    # Refusals leave every shard as it was and reach every rank.
    model, codes = _fsdp_problem("fsdp-vit")
    model = _fully_shard(model)
    before = _full(dict(model.named_parameters()))
    refusals = []
    for kwargs in (dict(inplace=True), dict(inplace=True, params=FSDP_CASES["fsdp-vit"]["params"] + ["cls"]), dict()):
        try:
            forget_distributed(model, codes, FORGET, **kwargs, **FSDP_FORGET)
            refusals.append(None)
        except (NotImplementedError, UnlearningError) as error:
            refusals.append(f"{type(error).__name__}: {error}")
    try:  # torch.func cannot run on shards: the reference engine says so
        mf.reference.class_fishers(model, codes, FORGET)
        refusals.append(None)
    except NotImplementedError as error:
        refusals.append(f"{type(error).__name__}: {error}")
    # A copy asked with lambda1="auto": refused before the calibration (or any forward) runs.
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        forget_distributed(model, codes, FORGET, lambda1="auto", lambda2=10.0, chunk_size=4)
        refusals.append(None)
    except UnlearningError as error:
        refusals.append(f"{type(error).__name__}: {error}")
    handle.remove()
    after = _full(dict(model.named_parameters()))
    results["fsdp-refusals"] = {"messages": refusals, "unchanged": all(torch.equal(before[n], after[n]) for n in before),
                                "forwards_before_auto_refusal": len(forwards)}
    return results


def _blocks_run(result, model: dict) -> dict:
    steps = result.calibration.diagnostics["blocks"]
    return {"lambda1": result.lambda1, "sign": result.sign, "blocks": steps.blocks, "scales": steps.scales,
            "model": model}


def _problem(case: dict):
    torch.manual_seed(0)
    dtype = case.get("dtype", torch.float32)
    model = models.MLP((1, 8, 8), 10, hidden=32).to(dtype)
    codes = mf.MnemonicCodes.generate(10, (1, 8, 8), per_class=case["per_class"], seed=1).to(dtype)
    return model, codes


def _forget_kwargs(mode: str) -> dict:
    kwargs = dict(lambda1=1e-1, lambda2=10.0, mode=mode, chunk_size=4)
    if mode == "dampen":  # lambda1 the threshold, lambda2 the dampening's lam
        kwargs.update(lambda1=2.0, lambda2=1.0)
    if mode == "gaussian":
        kwargs.update(generator=torch.Generator().manual_seed(7), tau=0.5)
    return kwargs


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {}
        for case_id, case in CASES.items():
            model, codes = _problem(case)
            wrapped = torch.nn.parallel.DistributedDataParallel(model) if case["ddp"] else model
            fisher_f, fisher_r = mf.class_fishers(wrapped, codes, FORGET, engine=DistributedEngine())
            result = forget_distributed(wrapped, codes, FORGET, **_forget_kwargs(case["mode"]))
            results[case_id] = {
                "fisher_f": fisher_f, "fisher_r": fisher_r,
                "model": result.model.state_dict(), "scores": result.candidate_scores,
            }
        # per-block steps on a replicated model (a small CNN: its block search shrinks a block)
        model, codes = _blocks_problem()
        result = forget_distributed(model, codes, FORGET, **AUTO_BLOCKS)
        results["auto-blocks"] = _blocks_run(result, result.model.state_dict())
        model, codes = _problem(CASES["k3-shift"])
        inputs, labels = codes.batch(range(codes.num_classes))
        seen = []
        handle = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
        split = DistributedEngine().correct(model, inputs, labels, 4)
        handle.remove()
        results["scoring"] = {"split": split, "whole": correct_predictions(model, inputs, labels), "seen": seen}
        model, codes = _problem(CASES["k1-shift"])
        if rank == 1:  # a replica that is not a replica: the ranks must notice
            with torch.no_grad():
                model[-1].bias.add_(5.0)
        try:
            forget_distributed(model, codes, FORGET, lambda1=1e-1, lambda2=10.0)
            results["disagreement"] = None
        except RankDisagreement as error:
            results["disagreement"] = str(error)
        results.update(_fsdp_runs(rank))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still has a collective in flight
    finally:
        dist.destroy_process_group()
    # The results are on disk: leave without the interpreter's teardown, where gloo's threads
    # have been seen to abort a spawned process ("terminate called without an active exception")
    # after all the work was done. An exception above still exits non-zero with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    # Loopback only: gloo otherwise picks the interface the hostname resolves to, which on a
    # sandboxed CI machine may not route between two local processes.
    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = saved or "lo"
    try:
        mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    finally:
        if saved is None:
            del os.environ["GLOO_SOCKET_IFNAME"]
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _max_rel_diff(a: dict, b: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name in a:
        scale = b[name].abs().max().clamp_min(1e-30)
        diff = ((a[name] - b[name]).abs().max() / scale).item()
        if diff >= worst:
            worst, where = diff, name
    return worst, where


@pytest.mark.parametrize("case_id", list(CASES))
def test_two_ranks_equal_one_process(runs, case_id):
    case = CASES[case_id]
    model, codes = _problem(case)
    exact = case.get("dtype", torch.float32) == torch.float64
    fisher_f, fisher_r = mf.class_fishers(model, codes, FORGET)
    single = mf.forget(model, codes, FORGET, **_forget_kwargs(case["mode"]))
    original, forgotten = model.state_dict(), single.model.state_dict()
    terms = codes.num_classes * codes.per_class  # at most every code is one term of a sum
    fisher_bound = EXACT["fisher"] if exact else float32_fisher_bound(terms, model)
    for rank, run in enumerate(runs):
        got = run[case_id]
        for label, mine, theirs in (("f_F", got["fisher_f"], fisher_f), ("f_R", got["fisher_r"], fisher_r)):
            diff, name = _max_rel_diff(mine, theirs)
            assert diff <= fisher_bound, f"rank {rank} {label}[{name}]: max relative difference {diff:.3g} > {fisher_bound:.3g}"
        assert got["scores"] == single.candidate_scores
        for name, expected in forgotten.items():
            diff, _ = _max_rel_diff({name: got["model"][name]}, {name: expected})
            bound = EXACT["model"] if exact else float32_model_bound(fisher_bound, expected - original[name], expected)
            assert diff <= bound, f"rank {rank} forgotten {name}: max relative difference {diff:.3g} > {bound:.3g}"


def test_ranks_end_identical(runs):
    for case_id in CASES:
        for name, value in runs[0][case_id]["model"].items():
            assert torch.equal(value, runs[1][case_id]["model"][name]), f"{case_id}: {name} differs between ranks"


def test_scoring_is_split_across_ranks(runs):
    """Each rank classifies only its share of the 30 codes (chunks of 4), yet every rank gets
    the whole vector of hits, equal to one process classifying all codes."""
    for rank, run in enumerate(runs):
        start, end = share(30, rank, WORLD)
        assert sum(run["scoring"]["seen"]) == end - start and max(run["scoring"]["seen"]) <= 4
        assert torch.equal(run["scoring"]["split"], run["scoring"]["whole"])


def test_disagreeing_replicas_raise_on_every_rank(runs):
    for rank, run in enumerate(runs):
        assert run["disagreement"] is not None, f"rank {rank} did not notice the replicas differ"


@pytest.mark.parametrize("num, world", [(1, 2), (30, 2), (27, 4), (3, 5)])
def test_share_covers_every_sample_once(num, world):
    slices = [share(num, r, world) for r in range(world)]
    assert slices[0][0] == 0 and slices[-1][1] == num
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    assert max(e - s for s, e in slices) - min(e - s for s, e in slices) <= 1


@pytest.mark.parametrize("case_id", list(FSDP_CASES))
def test_fsdp_sharded_model_equals_one_process(runs, case_id):
    """FSDP2 ranks hold shards (uneven ones included); Fisher and forgotten model, gathered,
    equal one process on the unsharded model; the model is edited in place."""
    model, codes = _fsdp_problem(case_id)
    params = FSDP_CASES[case_id]["params"]
    fisher_f, fisher_r = mf.class_fishers(model, codes, FORGET, params=params)
    single = mf.forget(model, codes, FORGET, params=params, **FSDP_FORGET)
    expected = dict(single.model.named_parameters())
    for name, p in model.named_parameters():  # really sharded: the ranks' rows partition dim 0
        rows = [run[case_id]["local_shapes"][name][0] for run in runs]
        assert sum(rows) == p.shape[0] and max(rows) < p.shape[0] or p.shape[0] == 1, (name, rows)
    for rank, run in enumerate(runs):
        got = run[case_id]
        assert got["same_object"]
        for label, mine, theirs in (("f_F", got["fisher_f"], fisher_f), ("f_R", got["fisher_r"], fisher_r)):
            assert mine.keys() == theirs.keys()
            diff, name = _max_rel_diff(mine, theirs)
            assert diff <= EXACT["fisher"], f"rank {rank} {label}[{name}]: max relative difference {diff:.3g}"
        assert got["scores"] == single.candidate_scores
        diff, name = _max_rel_diff(got["model"], {n: p.detach() for n, p in expected.items()})
        assert diff <= EXACT["model"], f"rank {rank} forgotten {name}: max relative difference {diff:.3g}"
        changed = [n for n in expected if not torch.equal(expected[n].detach(), dict(model.named_parameters())[n].detach())]
        assert changed, "the one-process run changed nothing: the comparison would be vacuous"


def test_fsdp_calibrated_lambda_equals_one_process(runs):
    model, codes = _blocks_problem()
    single = mf.forget(model, codes, FORGET, lambda1="auto", lambda2=10.0, calibration={"blocks": False})
    assert single.calibration.feasible and single.code_accuracy_after.forget == 0.0  # a real forgetting step
    for rank, run in enumerate(runs):
        assert run["fsdp-auto"]["lambda1"] == pytest.approx(single.lambda1, rel=1e-12)
        diff, name = _max_rel_diff(run["fsdp-auto"]["model"], {n: p.detach() for n, p in single.model.named_parameters()})
        assert diff <= EXACT["model"], f"rank {rank} {name}: max relative difference {diff:.3g}"


@pytest.fixture(scope="module")
def single_blocks():
    """One process's lambda1="auto" with per-block steps on the small CNN of "fsdp-cnn",
    trained on its codes (:func:`_blocks_problem`)."""
    model, codes = _blocks_problem()
    return mf.forget(model, codes, FORGET, **AUTO_BLOCKS)


@pytest.mark.parametrize("key", ["auto-blocks", "fsdp-auto-blocks"])
def test_block_steps_equal_one_process(runs, single_blocks, key):
    """lambda1="auto" with per-block steps under the distributed engine, on a replicated and on
    an FSDP2-sharded small CNN: the same lambda1, sign, blocks and scales as one process, and
    the same forgotten model (the block search's forwards run on every rank, in lockstep)."""
    single = single_blocks
    steps = single.calibration.diagnostics["blocks"]
    assert any(s != 1.0 for s in steps.scales), "no block was rescaled: the comparison would be vacuous"
    expected = {n: p.detach() for n, p in single.model.named_parameters()}
    for rank, run in enumerate(runs):
        got = run[key]
        assert got["lambda1"] == pytest.approx(single.lambda1, rel=1e-12)
        assert (got["sign"], got["blocks"], got["scales"]) == (single.sign, steps.blocks, steps.scales)
        diff, name = _max_rel_diff({n: got["model"][n] for n in expected}, expected)
        assert diff <= EXACT["model"], f"rank {rank} {key} {name}: max relative difference {diff:.3g}"


def test_fsdp_gaussian_perturbs_exactly_the_masked_entries(runs):
    """Shards draw independent noise: the values differ from one process, the mask may not."""
    model, codes = _fsdp_problem("fsdp-mlp")
    fisher_f, fisher_r = mf.class_fishers(model, codes, FORGET)
    for rank, run in enumerate(runs):
        for name, p in model.named_parameters():
            eta = fisher_f[name] / fisher_r[name]
            moved = run["fsdp-gaussian"][name] != p.detach()
            assert torch.equal(moved, eta > 0.5), f"rank {rank} {name}: noise outside (or missing from) the mask"
    assert all(torch.equal(runs[0]["fsdp-gaussian"][n], runs[1]["fsdp-gaussian"][n]) for n in runs[0]["fsdp-gaussian"])
    # The gathered copies above are equal by construction; the noise itself is checked against
    # the one-process Fisher: (new - old) / (alpha * eta) must be standard normal draws.
    lambda1, lambda2 = FSDP_FORGET["lambda1"], FSDP_FORGET["lambda2"]
    z = []
    for name, p in model.named_parameters():
        m = perturb.max_finite_ratio(fisher_f[name], fisher_r[name])
        eta = perturb.ratio(fisher_f[name], fisher_r[name], m)
        mask = eta > 0.5
        z.append(((runs[0]["fsdp-gaussian"][name] - p.detach()) / (perturb.alpha(m, lambda1, lambda2) * eta))[mask])
    z = torch.cat(z).double()
    assert z.numel() >= 200, "too few perturbed entries for the statistics below"
    assert abs(z.mean().item()) < 0.15 and abs(z.std().item() - 1.0) < 0.15, (z.mean().item(), z.std().item())


def test_fsdp_refusals_reach_every_rank_and_touch_nothing(runs):
    for rank, run in enumerate(runs):
        refusals = run["fsdp-refusals"]
        raw_params, raw_selected, copy_asked, reference, copy_auto = refusals["messages"]
        assert reference and "DistributedEngine" in reference
        assert copy_auto and "inplace=True" in copy_auto
        assert refusals["forwards_before_auto_refusal"] == 0, "lambda1='auto' ran on the model before the refusal"
        assert raw_params and "NotImplementedError" in raw_params and "cls" in raw_params
        # the class token is expanded to the batch before its use: no rule proves a layout for it
        # (the position embedding, added by hand, is taken at the operation level on shards:
        # fsdp-text and fsdp-windows cover such parameters)
        assert raw_selected and "cls" in raw_selected and "pos" not in raw_selected
        assert copy_asked and "inplace=True" in copy_asked
        assert refusals["unchanged"], f"rank {rank}: a refused call modified the shards"

"""Models, inputs and the authors' algorithm for the benchmarks (benchmarks/run.py, test_benchmarks.py).

Four models on the same footing: the paper's MLP and the small CNN from :mod:`mnemo_fast.evaluation.models`,
a CIFAR ResNet-18 (full width 64) and a 4-layer transformer encoder whose attention is written
with nn.Linear projections and F.scaled_dot_product_attention (nn.MultiheadAttention would send
its projections to the generic per-sample path: see mnemo_fast/fast/plan.py).
``authors_fisher`` / ``authors_formula`` / ``authors_forget`` restate the authors' script
(batch-1 backward per code, ~10 tensor ops per tensor, a deep copy per sign candidate).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mnemo_fast.evaluation.models import MLP, SmallCNN
from mnemo_fast.modeling import logits_of

Tensor = torch.Tensor


# ---- ResNet-18 (CIFAR stem: 3x3 conv, stride 1, no max-pool) -----------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs, widths 64-128-256-512 (11.2M parameters)."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**stage
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---- Transformer encoder (Linear q/k/v/out + scaled_dot_product_attention) --------------
class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(n, t, w))


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    """Token ids [N, T] -> logits [N, classes]: token + position embeddings, pre-norm layers, mean-pool."""

    def __init__(self, vocab: int = 1000, seq: int = 64, width: int = 256, layers: int = 4,
                 heads: int = 4, num_classes: int = 10, expand_positions: bool = True):
        super().__init__()
        # Position ids [N, T] (batch first) let the Embedding rule take the position table;
        # ids [T] broadcast over the batch send it to the generic per-sample path (RESULTS.md).
        self.expand_positions = expand_positions
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(seq, width)
        self.layers = nn.Sequential(*[EncoderLayer(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        if self.expand_positions:
            pos = pos.expand(ids.shape[0], -1)
        x = self.layers(self.tokens(ids) + self.positions(pos))
        return self.head(self.norm(x).mean(1))


# ---- Benchmark cases ----------------------------------------------------------------------
@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], Tensor]
    num_classes: int = 10


def _images(shape):
    return lambda n, gen: torch.rand(n, *shape, generator=gen)


def _token_ids(vocab: int, seq: int):
    return lambda n, gen: torch.randint(vocab, (n, seq), generator=gen)


CASES = {
    "mlp": Case("MLP 784-1000-10", lambda: MLP((1, 28, 28), 10), _images((1, 28, 28))),
    "cnn": Case("small CNN", lambda: SmallCNN((1, 28, 28), 10), _images((1, 28, 28))),
    "resnet18": Case("ResNet-18 (w64, 32x32)", ResNet18, _images((3, 32, 32))),
    "transformer": Case("Transformer 4x256, T=64", Transformer, _token_ids(1000, 64)),
}


def make(case: str, n: int, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """(model in eval mode with non-trivial BatchNorm statistics, inputs [n, ...], labels [n])."""
    torch.manual_seed(seed)
    spec = CASES[case]
    model = spec.build()
    for m in model.modules():  # running statistics that are not the identity
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(seed + 1)
    x = spec.inputs(n, gen)
    y = torch.randint(spec.num_classes, (n,), generator=gen)
    return model.eval(), x, y


def without_inplace(model: nn.Module) -> nn.Module:
    """A copy with ReLU(inplace=True) made out-of-place (Opacus/BackPACK module hooks need it)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


def _no_dropout(model: nn.Module) -> nn.Module:
    """Opacus records activations only in train mode: the same function as eval mode once every
    dropout probability is 0 (modules, and the floats attention layers pass to SDPA)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_dropout", "dropout_prob"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model


def opacus_sums(model: nn.Module, x: Tensor, y: Tensor, output_fn=logits_of) -> Callable[[], dict]:
    """A zero-argument callable: Opacus's per-sample gradients (its hooks; its functorch
    fallback for layers without one, e.g. BatchNorm: strict=False), squared and summed over the
    samples. Raises where Opacus cannot take the model or leaves a parameter without them."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(_no_dropout(without_inplace(model)).train(), batch_first=True,
                           loss_reduction="sum", strict=False)
    params = [(n.removeprefix("_module."), p) for n, p in gsm.named_parameters() if p.requires_grad]

    def run():
        for _, p in params:
            p.grad, p.grad_sample = None, None
        F.cross_entropy(output_fn(gsm(x)), y, reduction="sum").backward()
        missing = [n for n, p in params if p.grad_sample is None]
        if missing:
            raise NotImplementedError(f"no per-sample gradient for {missing[:2]}")
        return {n: p.grad_sample.square().sum(0) for n, p in params}

    return run


def backpack_sums(model: nn.Module, x: Tensor, y: Tensor, output_fn=logits_of) -> Callable[[], dict]:
    """A zero-argument callable: BackPACK's SumGradSquared. Raises where BackPACK cannot take
    the model or leaves a parameter without it (an unsupported layer)."""
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    net = extend(without_inplace(model).eval())
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))  # sum: no 1/N scaling of g_n
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]

    def run():
        for _, p in params:
            p.grad = None
        with backpack(SumGradSquared()):
            loss_fn(output_fn(net(x)), y).backward()
        missing = [n for n, p in params if not hasattr(p, "sum_grad_squared")]
        if missing:
            raise NotImplementedError(f"no sum_grad_squared for {missing[:3]} (unsupported layer)")
        return {n: p.sum_grad_squared for n, p in params}

    return run


def plain_forward_backward(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """The floor: one batched forward + backward with parameter gradients (eval mode, CE sum)."""
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y, reduction="sum").backward()


# ---- The authors' algorithm, restated compactly ---------------------------------------------
def authors_fisher(model: nn.Module, inputs: Tensor, labels: Tensor, eps: float = 1e-16) -> dict[str, Tensor]:
    """One batch-1 backward per code; accumulators start at eps; divided by the number of codes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.full_like(p, eps) for n, p in params.items()}
    for x, y in zip(inputs, labels):
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        for n, p in params.items():
            fisher[n] += p.grad.detach() ** 2
    return {n: f / len(labels) for n, f in fisher.items()}


def authors_formula(forget: Tensor, remain: Tensor, lambda1: float, lambda2: float) -> Tensor:
    """alpha * eta with eta = exp(log f_F - log f_R), NaN -> 0, inf -> largest finite eta."""
    eta = torch.exp(torch.log(forget) - torch.log(remain))
    eta = torch.nan_to_num(eta, nan=0.0, posinf=float("inf"))
    inf = torch.isinf(eta)
    finite = eta[~inf]
    top = finite.max() if finite.numel() else torch.zeros((), dtype=eta.dtype)
    eta[inf] = top
    return torch.clamp(lambda2 / top, max=lambda1) * eta


@torch.no_grad()
def authors_noise_pass(params: list[Tensor], forget: list[Tensor], remain: list[Tensor],
                       lambda1: float, lambda2: float, sign: float) -> None:
    for p, f, r in zip(params, forget, remain):
        p.add_(sign * authors_formula(f, r, lambda1, lambda2))


@torch.no_grad()
def _code_score(model: nn.Module, inputs: Tensor, labels: Tensor, forget: Tensor) -> float:
    correct = model(inputs).argmax(-1) == labels
    return correct[~forget].float().mean().item() + 1.0 - correct[forget].float().mean().item()


def authors_forget(model: nn.Module, codes, classes: list[int], lambda1: float, lambda2: float) -> nn.Module:
    """Batch-1 Fisher per class set, the formula, a deep copy per sign, scored on the codes."""
    model.eval()
    remain = [c for c in range(codes.num_classes) if c not in classes]
    fisher_f = authors_fisher(model, *codes.batch(classes))
    fisher_r = authors_fisher(model, *codes.batch(remain))
    inputs, labels = codes.batch(range(codes.num_classes))
    is_forget = torch.isin(labels, torch.tensor(classes))
    best, best_score = None, -math.inf
    for sign in (1.0, -1.0):
        candidate = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in candidate.named_parameters():
                p.add_(sign * authors_formula(fisher_f[n], fisher_r[n], lambda1, lambda2))
        score = _code_score(candidate, inputs, labels, is_forget)
        if score > best_score:
            best, best_score = candidate, score
    return best

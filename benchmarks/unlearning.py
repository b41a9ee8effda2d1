"""Benchmark of forgetting quality: all methods on the same trained models.

Thin wrapper around :mod:`mnemo_fast.evaluation.experiment` (same as ``mnemo-fast experiment``):

    python benchmarks/unlearning.py --data digits fashion-mnist --models mlp cnn resnet
"""

import sys

from mnemo_fast.evaluation.experiment import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The ground floor: the one signature of ``sum_squared_grads``, which every engine shares.

The reference, fast and distributed engines each compute the same thing, the Fisher sums
``{name: sum_n (dL_n/dw)^2}``, in their own way. They inherit the public method from
:class:`FisherSums` and write only :meth:`FisherSums._fisher_sums`, so the signature, its defaults
and its documentation stand in one place (:class:`mnemo_fast.engines.Engine` points here).
"""

from __future__ import annotations

import torch

from .modeling import OutputFn, logits_of

Tensor = torch.Tensor


class FisherSums:
    """The base of every engine: :meth:`sum_squared_grads` over :meth:`_fisher_sums`."""

    def sum_squared_grads(
        self,
        model: torch.nn.Module,
        inputs: Tensor,
        targets: Tensor,
        chunk_size: int | None = None,
        output_fn: OutputFn = logits_of,
    ) -> dict[str, Tensor]:
        """``{name: sum_n (dL_n/dw)^2}`` over the N samples of ``inputs`` [N, ...] with labels
        ``targets`` [N] (L_n the cross-entropy of sample n), for the model's trainable
        parameters, each sum shaped like its parameter, in the accumulation dtype
        (:func:`mnemo_fast.dtypes.accumulation_dtype`). ``chunk_size`` bounds how many samples
        go through the model at once; ``output_fn`` picks the logits from the model's output."""
        return self._fisher_sums(model, inputs, targets, chunk_size, output_fn)

    def _fisher_sums(self, model, inputs, targets, chunk_size, output_fn) -> dict[str, Tensor]:
        """The engine's own way of computing :meth:`sum_squared_grads` (arguments as there)."""
        raise NotImplementedError(f"{type(self).__name__} does not compute the Fisher sums")

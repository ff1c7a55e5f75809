"""Linear mode connectivity before and after alignment: the curves behind ``intertwiners align``.

:func:`compare_alignments` interpolates A with B as it is, and with B aligned to A by each method
(activations, weights) restricted to permutations or using the full intertwiner group, and with the full group
followed by REPAIR along the path (:mod:`.repair`); batch-norm statistics are recomputed at every alpha on the
training inputs. Each alignment is computed once and shared by the variants that use it (the REPAIR variant
interpolates the same aligned model as its full-group variant). :func:`plot_curves` draws loss and accuracy
against alpha, one line per variant.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .align import align
from .interpolation import DEFAULT_ALPHAS, InterpolationCurve, interpolate

# (label, method, group, repair); method None = no alignment
VARIANTS = (
    ("none", None, None, False),
    ("permutation (activations)", "activations", "permutation", False),
    ("full group (activations)", "activations", "full", False),
    ("full group + REPAIR (activations)", "activations", "full", True),
    ("permutation (weights)", "weights", "permutation", False),
    ("full group (weights)", "weights", "full", False),
    ("full group + REPAIR (weights)", "weights", "full", True),
)


@dataclass
class Comparison:
    curves: dict[str, InterpolationCurve]
    aligned: dict[str, nn.Module]
    seconds: dict[str, float]

    def rows(self) -> list[dict]:
        return [row for label, c in self.curves.items() for row in c.rows(label)]

    def barriers(self) -> dict[str, dict]:
        return {label: dict(c.barrier) for label, c in self.curves.items()}


def compare_alignments(model_a: nn.Module, model_b: nn.Module, train, test, alphas=DEFAULT_ALPHAS,
                       variants=VARIANTS, align_inputs=None, batch_size: int = 512) -> Comparison:
    """Interpolation curves on ``test`` for every variant ((label, method, group, repair) of :data:`VARIANTS`);
    ``train`` ((x, y) or a dataset) gives the inputs for the activations (``align_inputs`` overrides them), for
    the batch-norm statistics and for REPAIR's statistics. ``seconds``: the alignment's time per variant."""
    from .interpolation import inputs_of

    x_train = inputs_of(train)
    inputs = x_train if align_inputs is None else align_inputs
    curves, aligned, seconds, done = {}, {}, {}, {}
    for label, method, group, repair in variants:
        if method is None:
            b, seconds[label] = model_b, 0.0
        else:
            if (method, group) not in done:
                done[method, group] = align(model_a, model_b, inputs, method=method, group=group)
            r = done[method, group]
            b, seconds[label] = r.model, r.seconds
        aligned[label] = b
        curves[label] = interpolate(model_a, b, test, alphas, train_data=x_train, repair=repair,
                                    batch_size=batch_size, repair_batch_size=max(batch_size, len(x_train)))
    return Comparison(curves, aligned, seconds)


def plot_curves(comparison: Comparison, path, title: str = "") -> None:
    """Loss and accuracy against alpha, one line per variant, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._util import save_figure

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for label, c in comparison.curves.items():
        ax_l.plot(c.alphas, c.loss, marker="o", ms=3, label=label)
        ax_a.plot(c.alphas, c.accuracy, marker="o", ms=3, label=label)
    ax_l.set(xlabel="alpha  ((1-alpha)·A + alpha·B)", ylabel="test loss (cross-entropy)")
    ax_a.set(xlabel="alpha  ((1-alpha)·A + alpha·B)", ylabel="test accuracy (%)")
    ax_a.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)

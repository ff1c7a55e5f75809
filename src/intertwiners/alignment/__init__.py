"""Aligning and merging independently trained models through their intertwiner groups (beyond the paper).

>>> r = align(model_a, model_b, data)                  # B moved into A's basis: r.model, r.elements
>>> curve = interpolate(model_a, r.model, test, train_data=train)   # curve.barrier["accuracy"]
>>> curve = interpolate(model_a, r.model, test, train_data=train, repair=True)   # REPAIR along the path
>>> merged = merge([m1, m2, m3], data, eval_data=test)  # a model; merged.merge_report: accuracies, rounds
>>> canon = canonicalize(model, x)                      # normal form of the scaling part of the group

Everything is built on the public symmetry API (``symmetry_spec``, ``apply_symmetry``): where each space
acts is read off by probing (:mod:`.probe`), so nothing here is specific to an architecture.
See docs/alignment.md.
"""

from .align import AlignResult, align
from .canonical import canonicalize
from .interpolation import InterpolationCurve, interpolate
from .merging import MergeReport, merge

__all__ = ["AlignResult", "InterpolationCurve", "MergeReport", "align", "canonicalize", "interpolate", "merge"]

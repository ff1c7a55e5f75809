"""``align``: move model B into model A's basis through their intertwiner group (re-basin for any traced model).

The two models must have the same class, modules and parameter shapes (ValueError naming the difference
otherwise); B is traced (:func:`~intertwiners.symmetry_spec`), and its spec holds for A too. The element
found for each space is applied to B with :func:`~intertwiners.apply_symmetry`, so the aligned model
computes B's function (to rounding) with weights as close to A's as the method finds. The spec is traced
without its per-space safety check (seconds on a large model); the aligned model's outputs are compared
with B's on ``example_input`` instead, and only if they differ is the spec traced again with the check
(which pins any space that is not a symmetry) and the alignment redone.

* ``method="activations"``: features at every space's sites, streamed over ``data``
  (:mod:`.activation_matching`);
* ``method="weights"``: weight matching after putting the scaling part of both models in canonical form
  (:mod:`.canonical`, :mod:`.weight_matching`). GL spaces (no activation between two linear maps): the
  other spaces are matched on products that hide them (``W2·W1``), then each GL element is solved in closed
  form by least squares on B with the others applied (:mod:`.linear_spaces`); the activation method does the
  same for GL spaces without activation sites.

Attention spaces (head permutations × per-head maps) are matched by their weights with either method
(:mod:`.attention`), after the other spaces.

``group="permutation"`` restricts either method to permutations (no scalings, no signs): the classical
re-basin, for comparison.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import groups as G
from .._util import as_tensor
from ..features import SiteExtractor, iterate_inputs
from .activation_matching import SpaceStats, fit_space, identifiable
from .attention import align_attention
from .canonical import canonical_scales, scale_slot, squared_distance
from .closest_scales import fit_closest_scales, scalable
from .linear_spaces import collapse_linear_spaces, is_linear_space, solve_linear_space
from .spaces import space_slots
from .weight_matching import match_permutations, permute_slot, slots_by_key

METHODS = ("activations", "weights")
EXACT = 1e-10  # ||A - g·B||² at most this share of ||A||²: B = g·A found (float32 rounding), no second start
GROUPS = ("full", "permutation")


@dataclass
class AlignResult:
    """``elements``: {space: element} (dense (n, n) matrices, or (perm, scale) pairs with ``monomial=True``)
    that move B into A's basis; ``model``: B moved (same function as B); ``spec``: B's symmetry spec;
    ``skipped``: spaces left at the identity (e.g. attention head groups), with the reason."""

    elements: dict
    model: nn.Module
    method: str
    group: str
    spec: object = field(repr=False, default=None)
    seconds: float = 0.0
    sweeps: int = 0
    skipped: dict = field(default_factory=dict)  # space -> why it was left at the identity
    found_by: dict = field(default_factory=dict)
    """space -> how its element was found: ``"activations"``, ``"weights"`` (no activation sites to read, too
    few samples, or ``method="weights"``), ``"activations on k of n coordinates, weights on the rest (dead or
    twin units)"`` (the pairs the data tells apart kept, the others assigned by weight matching),
    ``"weights (GL: ...)"`` (a GL space: least squares on its rows and columns, how many
    directions the weights left undetermined and the fit's residual, or that the identity was kept and why:
    :func:`~.linear_spaces.solve_linear_space`) or ``"attention weights (...)"`` (which per-head maps were
    taken, or that the identity was kept: :func:`~.attention.align_attention_space`)."""
    residual: dict = field(default_factory=dict)
    """space -> the relative distance ||A - moved B|| / ||A|| over the parameters the space moves, after
    alignment (0 for models that differ by a group element, to rounding)."""


def input_batches(data, batch_size: int = 256):
    """Input batches from a tensor/array (N, ...), a dataset with ``.x``, an ``(x, y)`` pair of arrays, or an
    iterable of batches (tensors or ``(x, y, ...)`` tuples)."""
    if isinstance(data, tuple) and len(data) == 2 and all(hasattr(d, "shape") for d in data):
        data = data[0]  # (x, y)
    return iterate_inputs(data, batch_size)


def first_batch(data, batch_size: int = 256) -> torch.Tensor:
    batch = next(iter(input_batches(data, batch_size)), None)
    if batch is None:
        raise ValueError("data holds no input batches")
    return batch


def _state_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_same_structure_params(model_a: nn.Module, model_b: nn.Module) -> None:
    """ValueError naming the first difference between two models' parameter and buffer shapes."""
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise ValueError("expected two torch.nn.Module models")
    sa, sb = _state_shapes(model_a), _state_shapes(model_b)
    if sa.keys() != sb.keys():
        only = sorted(set(sa) ^ set(sb))[:5]
        raise ValueError(f"the models have different parameters (e.g. {only}): different architectures")
    for k in sa:
        if sa[k] != sb[k]:
            raise ValueError(f"the models differ in {k!r}: shape {sa[k]} vs {sb[k]} (different widths?)")


def check_same_structure(model_a: nn.Module, model_b: nn.Module) -> None:
    """ValueError naming the first difference between two models' classes, modules, parameters and buffers.

    Models that agree in all of these run the same forward code on the same shapes, so tracing either gives
    the same symmetry spec (only B is traced)."""
    if type(model_a) is not type(model_b):
        raise ValueError(f"the models are of different classes: {type(model_a).__name__} and "
                         f"{type(model_b).__name__}")
    mods_a = [(n, type(m).__name__) for n, m in model_a.named_modules()]
    mods_b = [(n, type(m).__name__) for n, m in model_b.named_modules()]
    if mods_a != mods_b:
        diff = next(((x, y) for x, y in zip(mods_a, mods_b) if x != y), (mods_a[len(mods_b):], mods_b[len(mods_a):]))
        raise ValueError(f"the models have different modules (different architectures): {diff[0]} vs {diff[1]}")
    check_same_structure_params(model_a, model_b)


def check_runs(model: nn.Module, x, what: str = "data") -> None:
    """ValueError when ``model`` cannot take the batch ``x`` (wrong shape or dtype)."""
    p = next(iter(model.parameters()), None)
    if isinstance(x, torch.Tensor) and p is not None and x.is_floating_point():
        x = x.to(device=p.device, dtype=p.dtype)
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            try:
                model(x[:2])
            finally:
                model.train(was)
    except Exception as err:
        raise ValueError(f"{what} of shape {tuple(x.shape)} does not fit the model: {err}") from err


def _on_model(model: nn.Module, example_input):
    """(input on the model's device and floating dtype, the relative tolerance of the outputs check)."""
    p = next(iter(model.parameters()), None)
    x = example_input
    if p is not None and x.is_floating_point():
        x = x.to(device=p.device, dtype=p.dtype)
    return x, (1e-8 if p is not None and p.dtype == torch.float64 else 1e-3)


def same_function(model: nn.Module, moved: nn.Module, example_input) -> bool:
    """True when ``moved`` computes ``model``'s outputs on ``example_input`` (eval mode, and train mode where
    the model has batch statistics) to rounding: relative 1e-8 in float64, 1e-3 otherwise (the tolerances
    of the spec's safety check)."""
    from ..symmetries.compare import has_running_stats
    from ..symmetries.verify import compare

    x, rtol = _on_model(model, example_input)
    modes = ("eval", "train") if has_running_stats(model) else ("eval",)
    try:
        errs = compare(model, moved, x, modes)
    except Exception:  # noqa: BLE001 - a model that cannot run in a mode: the checked spec decides
        return False
    return all(e[1] <= rtol for e in errs.values())


def reference_outputs(model: nn.Module, example_input):
    """``model``'s outputs on ``example_input`` in eval mode, kept for :func:`same_outputs` when the model is
    then moved in place (models without batch statistics: :func:`same_function` checks eval mode only)."""
    from ..symmetries.compare import forward_once

    x, _ = _on_model(model, example_input)
    return forward_once(model, (x,), False)


def same_outputs(reference, moved: nn.Module, example_input) -> bool:
    """:func:`same_function` against outputs kept by :func:`reference_outputs` (same tolerances)."""
    from ..symmetries.compare import forward_once, output_errors

    x, rtol = _on_model(moved, example_input)
    try:
        err = output_errors(reference, forward_once(moved, (x,), False))
    except Exception:  # noqa: BLE001 - as in same_function
        return False
    return err[1] <= rtol


def _as_element(el, dense: bool):
    if isinstance(el, tuple):
        return G.monomial_matrix(*el) if dense else el
    return el


class SiteError(ValueError):
    """The spec's activation sites cannot be read on the model (feature extraction does not find them)."""


@contextmanager
def few_threads(n: int = 1):
    """Run many small tensor operations on ``n`` intra-op threads (restored afterwards): on a busy
    machine, small reductions are an order of magnitude faster without thread hand-offs."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def without_parameters(actions: dict, params: set) -> dict:
    """The actions with the slots of ``params`` left out (a space that would keep no slot keeps them all)."""
    out = {}
    for name, act in actions.items():
        kept = [sl for sl in act.slots if sl.tensor not in params]
        out[name] = dataclasses.replace(act, slots=kept) if kept else act
    return out


def weight_residuals(model_a: nn.Module, moved: nn.Module, spec, names: list[str]) -> dict[str, float]:
    """{space: ||A - moved||_F / ||A||_F over the parameters the space's slots move}."""
    pa, pm = dict(model_a.named_parameters()), dict(moved.named_parameters())
    out = {}
    for name in names:
        keys = sorted({s.tensor for s in spec.slots(name) if s.kind == "parameter" and s.tensor in pa})
        sums = [squared_distance(pa[k], pm[k]) for k in keys]  # sorted: the same sum in every process
        num, den = sum(d for d, _ in sums), sum(n for _, n in sums)
        out[name] = (num / den) ** 0.5 if den > 0 else 0.0
    return out


@torch.no_grad()
def align_weights(model_a: nn.Module, model_b: nn.Module, spec, actions: dict, scaling: bool = True,
                  max_sweeps: int = 30, how: dict | None = None, pins: dict | None = None) -> tuple[dict, int]:
    """{space: (perm, scale)} moving B into A's basis by weight matching; and the number of sweeps.

    With ``scaling``, GL spaces get a dense (n, n) element: the other spaces are matched on products that
    hide the GL spaces, then each GL element is solved in closed form on B with the others applied
    (:mod:`.linear_spaces`); ``how`` (a dict, filled when given) says, per GL space, how its element was
    found and the residual of the fit. ``pins``: {space: (B's indices, A's indices)} pairs the permutations
    keep (:func:`~.weight_matching.match_permutations`)."""
    # only the parameters some space moves are read; they are copied only where the canonical form rescales
    # them (in place), so that weight matching holds at most one extra copy of each model's moved parameters
    pa, pb = moved_parameters(model_a, actions), moved_parameters(model_b, actions)
    if scaling:
        pa, pb = {k: t.clone() for k, t in pa.items()}, {k: t.clone() for k, t in pb.items()}
    found, sweeps = match_weights(pa, pb, actions, scaling, max_sweeps, pins=pins)
    linear = [n for n, a in actions.items() if scaling and is_linear_space(a)]
    if linear:
        found.update(solve_linear_spaces(model_a, model_b, spec, actions, found, linear, how))
    return found, sweeps


def solve_linear_spaces(model_a: nn.Module, model_b: nn.Module, spec, actions: dict, found: dict,
                        linear: list[str], how: dict | None = None) -> dict:
    """{GL space: (n, n) element} solved in closed form (:func:`~.linear_spaces.solve_linear_space`) on B
    moved by ``found`` (the other spaces' elements), one GL space at a time: each is fitted on its slots whose
    tensors no GL space still unsolved moves (all its slots when there are none), and applied before the next."""
    from ..symmetries import apply_symmetry

    pa = moved_parameters(model_a, {n: actions[n] for n in linear})
    done = {n: el for n, el in found.items() if n not in linear}
    out, pending = {}, list(linear)
    while pending:
        moved = apply_symmetry(model_b, done, spec) if done else model_b
        pb = moved_parameters(moved, {n: actions[n] for n in linear})
        name, use = pending[0], None
        for cand in pending:
            others = [actions[m] for m in pending if m != cand]
            free = [s for s in actions[cand].slots if not any(_touches(o, s.tensor) for o in others)]
            if free:
                name, use = cand, free
                break
        fit = solve_linear_space(pa, pb, actions[name], use)
        out[name] = done[name] = fit.element
        if how is not None:
            how[name] = fit.how
        pending.remove(name)
    return out


def _touches(act, tensor: str) -> bool:
    return any(s.tensor == tensor for s in act.slots)


def moved_parameters(model: nn.Module, actions: dict) -> dict[str, torch.Tensor]:
    """{name: detached parameter} of the parameters some space's slots move (the model's own tensors)."""
    used = {s.tensor for act in actions.values() for s in act.slots}
    return {k: p.detach() for k, p in model.named_parameters() if k in used}


def match_weights(pa: dict, pb: dict, actions: dict, scaling: bool = True, max_sweeps: int = 30,
                  keep_bytes: int | None = None, pins: dict | None = None) -> tuple[dict, int]:
    """:func:`align_weights` on parameter dicts; with ``scaling`` they are rescaled to the canonical form IN
    PLACE (pass copies, or tensors that are restored afterwards). ``keep_bytes``: the memory bound of the
    assignment scores kept between solves (:func:`~.weight_matching.match_permutations`; None: no bound).

    With ``scaling``, the permutations are matched on the canonical forms (a planted element is found
    exactly) and, where some space has scalings that no normalisation's gain carries
    (:func:`~.closest_scales.scalable`: networks without norms), those spaces' scales are then the ones that
    bring B's weights closest to A's (:mod:`.closest_scales`); unless that found B = g·A (``EXACT``), the
    same is done from the weights as they are, and the start that ends closer is kept. So where there are no
    norms, B aligned by the full group is never farther from A than B aligned by permutations alone (with the
    same sweeps)."""
    if not scaling:
        perms, sweeps = match_permutations(pa, pb, actions, max_sweeps, keep_bytes=keep_bytes, pins=pins)
        return {n: (perms[n], torch.ones(a.size, dtype=torch.float64)) for n, a in actions.items()}, sweeps
    # GL spaces: the others are matched on products that hide them (solved afterwards)
    pa, pb, inner, _ = collapse_linear_spaces(pa, pb, actions)
    inner = {n: a for n, a in inner.items() if not is_linear_space(a)}
    fit_scales = any(scalable(a) for a in inner.values())
    canonical_b = dict(pb)   # B's canonical tensors (the start below moves copies of them)
    sa, sb = canonical_scales(pa, inner), canonical_scales(pb, inner)
    out, sweeps, distance, norm_a = _weight_start(pa, pb, inner, (sa, sb), max_sweeps, keep_bytes, pins,
                                                  fit_scales)
    if fit_scales and distance > EXACT * norm_a:
        # not B = g·A: also from the weights as they are (pa holds A again; B's canonical scales undone in place)
        for name, act in inner.items():
            for s in act.slots:
                scale_slot(canonical_b[s.tensor], s, s.factor(1.0 / sb[name]))
        raw = _weight_start(pa, canonical_b, inner, None, max_sweeps, keep_bytes, pins, True)
        if raw[2] < distance:
            out, sweeps, distance, _ = raw
    for name, act in actions.items():  # GL spaces: the identity, until solved (solve_linear_spaces)
        out.setdefault(name, (torch.arange(act.size), torch.ones(act.size, dtype=torch.float64)))
    return out, sweeps


def _weight_start(pa: dict, pb: dict, actions: dict, canonical: tuple | None, max_sweeps: int,
                  keep_bytes: int | None, pins: dict | None, fit: bool) -> tuple[dict, int, float, float]:
    """(elements, sweeps, ||A - g·B||² and ||A||² over the matched tensors, or 0 and 0 without ``fit``) of
    weight matching from one start: ``canonical`` (A's and B's canonical scales: ``pa``/``pb`` hold the
    canonical forms) or None (the weights as they are). ``fit``: the closest scales (:func:`closest_scales`),
    which leaves ``pa``/``pb`` moved to A and B in A's basis."""
    perms, sweeps = match_permutations(pa, pb, actions, max_sweeps, keep_bytes=keep_bytes, pins=pins)
    sa, sb = canonical if canonical is not None else (None, None)
    closest, distance, norm_a = closest_scales(pa, pb, actions, perms, sa) if fit else ({}, 0.0, 0.0)
    out = {}
    for name, act in actions.items():
        ident, ones = torch.arange(act.size), torch.ones(act.size, dtype=torch.float64)
        to_a = (ident, closest.get(name, ones) / (sa[name] if sa is not None else 1.0))  # A's scales, then the
        to_canon_b = (ident, sb[name] if sb is not None else ones)                      # closest correction
        out[name] = G.monomial_compose(to_a, G.monomial_compose((perms[name], ones), to_canon_b))
    return out, sweeps, distance, norm_a


def closest_scales(pa: dict, pb: dict, actions: dict, perms: dict, sa: dict | None) -> tuple[dict, float, float]:
    """({space: (n,) factors}, ||A - g·B||², ||A||²): the factors that, after B (``pb``) is permuted into A's basis and
    given A's scales back (``sa``: A's canonical scales, undone; None: none), bring B's weights closest to A's
    on the spaces :func:`~.closest_scales.scalable` admits (:mod:`.closest_scales`), the distance that remains
    and A's squared norm, over every matched tensor. ``pa`` and ``pb`` are moved IN PLACE to A as it is and B in
    A's basis (``pb``'s entries replaced by moved copies)."""
    for name, act in actions.items():
        for s in act.slots:
            pb[s.tensor] = permute_slot(pb[s.tensor], s, perms[name])
            if sa is not None:
                undo = s.factor(1.0 / sa[name])
                scale_slot(pa[s.tensor], s, undo)
                scale_slot(pb[s.tensor], s, undo)
    factors = fit_closest_scales(pa, pb, actions)
    sums = [squared_distance(pa[k], pb[k]) for k in sorted(slots_by_key(actions))]
    return factors, sum(d for d, _ in sums), sum(n for _, n in sums)


def plan_spaces(spec, spaces: list[str] | None = None) -> tuple[list[str], list[str], dict]:
    """(spaces matched by data or weights, attention spaces, {skipped space: why}) of ``spaces`` (default all)."""
    names = list(spec.spaces) if spaces is None else list(spaces)
    unknown = [n for n in names if n not in spec.spaces]
    if unknown:
        raise ValueError(f"unknown spaces {unknown}; the models' spaces are {list(spec.spaces)}")
    attention = [n for n in names if spec.spaces[n].group.kind == "attention_heads"]
    skipped = {n: f"its group ({spec.spaces[n].group.kind}) is not an intertwiner group of an activation; "
                  "left at the identity" for n in names
               if spec.spaces[n].group.kind not in G.KINDS and n not in attention}
    return [n for n in names if n not in skipped and n not in attention], attention, skipped


def weight_actions(spec, names: list[str], attention: list[str]) -> dict:
    """The slots weight matching reads for ``names``: B's attention weights are still in its heads' bases
    while the other spaces are matched, so they are left out of the costs."""
    actions = {n: space_slots(spec, n) for n in names}
    if attention:
        actions = without_parameters(actions, {a.param for n in attention for a in spec.actions(n)})
    return actions


def align_activations(model_a: nn.Module, model_b: nn.Module, spec, actions: dict, data, scaling: bool = True,
                      batch_size: int = 256, identify: bool = False):
    """{space: element} moving B into A's basis by matching features streamed over ``data``.

    ``identify=True``: ``(found, unidentified, pins)``, leaving out of ``found`` the spaces whose coordinates
    the data cannot all tell apart (:func:`~.activation_matching.identifiable`; dense spaces: no more samples
    than coordinates), for the weights; ``pins[space] = (B's indices, A's indices)``: the pairs of such a
    monomial space that the data does tell apart, matched as the fit matched them, for the weights to keep."""
    sites = list(dict.fromkeys(s.tensor for a in actions.values() for s in a.slots))
    stats = {n: SpaceStats(a) for n, a in actions.items() if a.slots}
    ext_a = ext_b = None
    for xb in input_batches(data, batch_size):
        if ext_a is None:
            try:
                ext_a = SiteExtractor(model_a, sites, example=xb[:2])
                ext_b = SiteExtractor(model_b, sites, example=xb[:2])
            except ValueError as err:
                if "unknown activation site" not in str(err):
                    raise
                raise SiteError(str(err)) from err
        fa = dict(zip(ext_a.sites, ext_a(xb)))
        fb = dict(zip(ext_b.sites, ext_b(xb)))
        for st in stats.values():
            st.update(fa, fb)
    if ext_a is None:
        raise ValueError("data holds no input batches")
    if not identify:
        return {n: fit_space(st, scaling) for n, st in stats.items()}
    # no more samples than coordinates at a site: nothing to fit (a single sample has no correlations at all)
    unknown = {n for n, st in stats.items() if any(st_.n <= st.action.size for st_ in st.stats)}
    found = {n: fit_space(st, scaling) for n, st in stats.items() if n not in unknown}
    pins = {}
    for n, st in stats.items():
        if n in unknown or (scaling and not st.action.group.is_monomial):   # dense groups: least squares
            continue
        told = identifiable(st)
        if told is not None and bool(told[0].all()) and bool(told[1].all()):
            continue
        unknown.add(n)
        if told is not None:   # the pairs the data tells apart are kept; the weights match the others
            perm, _ = G.monomial_inverse(*found[n])     # the fitted g (B ~ g·A): A's i is B's perm[i]
            keep = torch.nonzero(told[0] & told[1][perm]).flatten()
            if len(keep):
                pins[n] = (perm[keep], keep)
    return {n: el for n, el in found.items() if n not in unknown}, unknown, pins


def align(model_a: nn.Module, model_b: nn.Module, data=None, example_input=None, method: str = "activations",
          *, group: str = "full", spaces: list[str] | None = None, monomial: bool = False, batch_size: int = 256,
          max_sweeps: int = 30, threads: int = 1) -> AlignResult:
    """Move ``model_b`` into ``model_a``'s basis through their intertwiner group.

    ``data``: inputs (tensor/array (N, ...), a dataset with ``.x``, ``(x, y)``, or an iterable of batches);
    needed for ``method="activations"``. ``example_input``: one batch used to trace the models (default: the
    first batch of ``data``). ``group``: ``"full"`` (the whole intertwiner group: permutations, scalings,
    signs, GL) or ``"permutation"``. ``spaces``: the spaces to align (default all; the others keep the
    identity). ``monomial=True`` returns (perm, scale) pairs instead of dense matrices for monomial spaces.
    ``threads``: intra-op CPU threads for the matching (1 is fastest for the many small products of small
    models on a busy machine; raise it for wide models).
    Returns an :class:`AlignResult` (``.elements``, ``.model``).
    """
    from ..symmetries import apply_symmetry, symmetry_spec

    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise ValueError("align needs two torch.nn.Module models")
    if method == "activations" and data is None:
        raise ValueError("method='activations' needs data (inputs to read features on)")
    if example_input is None:
        if data is None:
            raise ValueError("align needs example_input (or data) to trace the models")
        example_input = first_batch(data, batch_size)[:8]
    example_input = as_tensor(example_input, name="example_input")
    check_runs(model_a, example_input, "example_input")
    if data is not None:
        check_runs(model_a, first_batch(data, batch_size), "data")
    check_same_structure(model_a, model_b)
    for checked in (False, True):
        # the spec is traced without its per-space safety check; the aligned model is checked instead (below),
        # and only if that fails is the spec traced again with the check (which pins spaces that are not
        # symmetries) and the alignment redone
        spec_b = symmetry_spec(model_b, example_input, check=checked)
        names, attention, skipped = plan_spaces(spec_b, spaces)
        scaling = group == "full"
        sweeps = 0
        found, found_by, pins = {}, {}, {}
        if method == "activations":
            sites = {n: space_slots(spec_b, n, "sites") for n in names}
            by_data = {n: a for n, a in sites.items() if a.slots}
            with few_threads(threads):
                try:
                    found, _, pins = align_activations(model_a, model_b, spec_b, by_data, data, scaling,
                                                       batch_size, identify=True)
                except SiteError:  # the sites cannot be read on this model (its forward is not traceable
                    found = {}     # by torch.fx): every space is matched by its weights, found_by says so
            found_by = dict.fromkeys(found, "activations")
        rest = [n for n in names if n not in found]
        moved = apply_symmetry(model_b, found, spec_b) if found else model_b
        if rest:  # matched by their weights (on B with the spaces found by data already moved)
            actions = weight_actions(spec_b, rest, attention)
            linear_how: dict = {}
            with few_threads(threads):
                by_weights, sweeps = align_weights(model_a, moved, spec_b, actions, scaling, max_sweeps, linear_how,
                                                   pins)
            found.update(by_weights)
            found_by.update(dict.fromkeys(by_weights, "weights"))
            found_by.update({n: f"activations on {len(pins[n][0])} of {spec_b.spaces[n].size} coordinates, weights "
                                f"on the rest (dead or twin units)" for n in pins if n in by_weights})
            found_by.update(linear_how)
            moved = apply_symmetry(model_b, found, spec_b)
        if attention:  # heads matched on B with its other spaces already aligned (the spaces commute)
            heads, how = align_attention(model_a, moved, spec_b, attention, scaling)
            found.update(heads)
            found_by.update(how)
            moved = apply_symmetry(model_b, found, spec_b)
        if checked or same_function(model_b, moved, example_input):
            break
    elements = {n: _as_element(el, not monomial) for n, el in found.items()}
    residual = weight_residuals(model_a, moved, spec_b, list(found))
    return AlignResult(elements, moved, method, group, spec_b, time.perf_counter() - start, sweeps, skipped,
                       found_by, residual)

"""What a rule sees and records: :class:`Context`, the rule's view of one pass over a captured graph.

A rule (built in, under :mod:`~intertwiners.symmetries.ops`, or a user's, see
:func:`~intertwiners.symmetries.register_rule`) is ``rule(ctx: Context, node: torch.fx.Node) -> value``.
It reads its inputs with :meth:`Context.value` (a :class:`~intertwiners.symmetries.layout.Layout` for a
hidden value, a :class:`~intertwiners.symmetries.records.ParamRef` for a parameter, None for an
untransformed tensor, plain Python values for the rest), records what the operation does to the channels
(:meth:`~Context.tie`, :meth:`~Context.require`, :meth:`~Context.rows`, :meth:`~Context.columns`,
:meth:`~Context.gain`, :meth:`~Context.permuted`, :meth:`~Context.activation`) and returns the output: a
Layout (new channels from :meth:`~Context.fresh`, or an input's channels moved by the functions of
:mod:`~intertwiners.symmetries.layout`), a ParamRef, None, or a list of these (``split``). When it cannot
follow the channels it returns :meth:`~Context.unsupported`, which pins them with a reason: an operation
that is not understood costs a symmetry, never yields a wrong one.

Channels are *atoms* joined by a union-find with a dual parity (:class:`Atoms`): a tie with ``dual`` says
that one side carries A^-T of the other (queries and keys of attention).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch.fx as fx
from torch import nn

from .. import groups as G
from .capture import Captured, owner, shape_of
from .chains import ONE
from .constraints import Activation
from .layout import FIXED, ZERO, Channels, Layout, Side, broadcast_to, simple
from .records import (
    Analysis,
    AttentionRecord,
    ParamRef,
    ParamUse,
    Pins,
    Requirement,
    ResampledParam,
    SiteRecord,
    SlicedParam,
    Span,
    Tie,
)


class Atoms:
    """Union-find over channel atoms with a dual parity per atom (1: the atom carries A^-T of its root)."""

    def __init__(self):
        self.parent: list[int] = []
        self.parity: list[int] = []
        self._pinned: list[np.ndarray] = []   # pin event k: the atoms it fixed (each once) ...
        self._why: list[str] = []             # ... and its reason

    def __len__(self) -> int:
        return len(self.parent)

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.parity.extend([0] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> tuple[int, int]:
        """(root, parity of a relative to the root), with path compression."""
        p, path = 0, []
        while self.parent[a] != a:
            path.append(a)
            p ^= self.parity[a]
            a = self.parent[a]
        acc = p
        for node in path:
            old = self.parity[node]
            self.parent[node] = a
            self.parity[node] = acc
            acc ^= old
        return a, p

    def union(self, a: int, b: int, dual: int = 0, reason: str = "") -> None:
        """Join atoms a and b; with ``dual`` the transform of b is the inverse transpose of a's."""
        ra, pa = self.find(a)
        rb, pb = self.find(b)
        if ra == rb:
            if pa ^ pb != dual:
                self._event(np.array([ra], dtype=np.int64), f"{reason}: a channel would need A = A^-T")
            return
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.parity[hi] = pa ^ pb ^ dual

    def union_arrays(self, a: np.ndarray, b: np.ndarray, dual: int = 0, reason: str = "") -> None:
        """Join a[i] with b[i] for every i; an atom that meets an untransformed channel is pinned."""
        both = (a >= 0) & (b >= 0)
        pairs = np.unique(np.stack([a[both], b[both]], 1), axis=0) if both.any() else np.zeros((0, 2), np.int64)
        for x, y in pairs.tolist():
            if x != y or dual:
                self.union(x, y, dual, reason)
        for mine, other in ((a, b), (b, a)):
            bad = (mine >= 0) & (other == FIXED)
            self._event(np.unique(mine[bad]), f"{reason}: it meets untransformed channels")

    def pin(self, atoms: np.ndarray, reason: str) -> None:
        self._event(np.unique(atoms[atoms >= 0]), reason)

    def _event(self, atoms: np.ndarray, reason: str) -> None:
        if len(atoms):
            self._pinned.append(atoms.astype(np.int64, copy=False))
            self._why.append(reason)

    def pins(self) -> Pins:
        """Every pin so far (:class:`~intertwiners.symmetries.records.Pins`)."""
        atoms = np.concatenate(self._pinned) if self._pinned else np.zeros(0, np.int64)
        events = np.repeat(np.arange(len(self._pinned), dtype=np.int64), [len(a) for a in self._pinned])
        return Pins(atoms, events, tuple(self._why))

    def resolved(self) -> tuple[np.ndarray, np.ndarray]:
        """(roots, parities) of every atom, as :meth:`find` gives them: pointer jumping on the parent array
        (each round halves every path; a root is its own parent with parity 0)."""
        parent = np.array(self.parent, dtype=np.int64)
        parity = np.array(self.parity, dtype=np.int64)
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                return parent, parity
            parity = parity ^ parity[parent]
            parent = up


def _channels(x: Layout | Channels) -> Channels:
    return x.channels if isinstance(x, Layout) else x


class Context:
    """One pass over a captured graph, as the rules see it (see the module docstring).

    Public attributes: ``model`` (the module being analysed) and ``graph`` (its captured aten graph).
    """

    def __init__(self, cap: Captured, model: nn.Module):
        self.model = model
        self.graph = cap.graph
        self.captured = cap
        self.atoms = Atoms()
        self.env: dict[fx.Node, object] = {}
        self.scratch: dict[str, object] = {}   # per-family state of the built-in rules (regions, scores, ...)
        self._chains: list[tuple] = [()]
        self._chain_ids: dict[tuple, int] = {(): 0}
        self._groups: dict[str, object] = {}
        self._values: list[Layout] = []
        self._kept: set[int] = set()
        self._requirements: list[Requirement] = []
        self._ties: list[Tie] = []
        self._uses: list[ParamUse] = []
        self._sites: list[SiteRecord] = []
        self._attention: list[AttentionRecord] = []
        self._outputs: list[np.ndarray] = []
        self._site_counts: dict[str, int] = defaultdict(int)

    # -- reading ------------------------------------------------------------------------------------------
    def value(self, arg, resampled: bool = False):
        """What a node argument holds: a Layout (hidden), ParamRef/DerivedParam (parameter), None (an
        untransformed tensor), or the Python value itself (lists are mapped element by element). A
        :class:`~.records.ResampledParam` only for a rule that asks (``resampled``); None for the others."""
        if isinstance(arg, fx.Node):
            v = self.env.get(arg)
            return None if isinstance(v, ResampledParam) and not resampled else v
        if isinstance(arg, list | tuple):
            return type(arg)(self.value(a, resampled) for a in arg)
        return arg

    @staticmethod
    def arg(node: fx.Node, i: int, name: str, default=None):
        """Positional argument ``i`` of ``node``, else its keyword argument ``name``, else ``default``."""
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name, default)

    @staticmethod
    def shape(node) -> tuple | None:
        """The shape of a node's (tensor) output, None for non-tensors."""
        return shape_of(node)

    def hidden_inputs(self, node: fx.Node) -> list[Layout]:
        """The hidden values among ``node``'s inputs (lists flattened)."""
        out = []
        for a in node.all_input_nodes:
            v = self.env.get(a)
            if isinstance(v, Layout):
                out.append(v)
            elif isinstance(v, list | tuple):
                out.extend(x for x in v if isinstance(x, Layout))
        return out

    def describe(self, node: fx.Node) -> str:
        """``'op' in module.path (Class)``, for reasons."""
        path, cls = owner(node)
        cls = getattr(cls, "__name__", str(cls).split(".")[-1]) if cls is not None else None
        where = f" in {path or 'the model'}" + (f" ({cls})" if cls else "")
        name = getattr(node.target, "__name__", str(node.target))
        return f"'{name}'{where}"

    # -- values --------------------------------------------------------------------------------------------
    def fresh(self, shape: tuple, dim: int, *, unscaled: bool = False) -> Layout:
        """A value with new channels on dimension ``dim`` of ``shape`` (a producer's output). ``unscaled``:
        the value is only permuted (its scaling is carried by what reads it, e.g. a batch norm)."""
        n = shape[dim]
        chain = self.chain_id((ONE,)) if unscaled else 0
        return self.keep(simple(self.atoms.new(n), np.full(n, chain, dtype=np.int64), shape, dim))

    def keep(self, lay: Layout) -> Layout:
        """Register a hidden value (spaces are the channels held by the same values); returns it."""
        if id(lay) not in self._kept:
            self._kept.add(id(lay))
            self._values.append(lay)
        return lay

    # -- facts -----------------------------------------------------------------------------------------------
    def tie(self, a: Layout | Channels, b: Layout | Channels, reason: str) -> None:
        """Channels of ``a`` and ``b`` carry the same transform, position by position (a residual add)."""
        a, b = _channels(a), _channels(b)
        self.atoms.union_arrays(a.atoms, b.atoms, 0, reason)
        self._ties.append(Tie(a, b))

    def require(self, kind: type, x: Layout | Channels, key: str | None = None) -> None:
        """Constraint ``kind`` (e.g. :class:`~intertwiners.symmetries.constraints.Unit`) on x's transform."""
        self._requirements.append(Requirement(kind, _channels(x), key))

    def rows(self, param: ParamRef | SlicedParam, dim: int | None, x: Layout | Channels) -> None:
        """``param`` moves t -> T t along ``dim`` (None: flattened), T the transform of ``x``'s channels."""
        self._use(param, dim, "rows", _channels(x))

    def columns(self, param: ParamRef | SlicedParam, dim: int | None, x: Layout | Channels, groups: int = 1) -> None:
        """``param`` moves w -> w T^-1 along ``dim`` (its input columns). ``groups`` > 1: a grouped convolution's
        weight (C_out, C_in/groups, ...) with ``x`` the C_in input channels: block g of output rows reads block g
        of the channels."""
        ch = _channels(x)
        if groups == 1:
            self._use(param, dim, "columns", ch)
            return
        if isinstance(param, SlicedParam) or dim != 1:
            raise ValueError("a grouped convolution's weight must be a whole parameter read along axis 1")
        co, ci = param.shape[0] // groups, len(ch.atoms) // groups
        for g in range(groups):
            part = Channels(ch.atoms[g * ci:(g + 1) * ci], ch.chains[g * ci:(g + 1) * ci])
            self._uses.append(ParamUse(param.name, dim, "columns", part,
                                       span=Span(0, g * co, (g + 1) * co, tuple(param.shape))))

    def gain(self, param: ParamRef | SlicedParam, dim: int | None, out: Layout | Channels,
             inp: Layout | Channels) -> None:
        """``param`` is a per-channel factor between ``inp`` and ``out``: w -> P diag(t/s) w."""
        self._use(param, dim, "gain", _channels(out), _channels(inp))

    def permuted(self, param: ParamRef | SlicedParam, dim: int | None, x: Layout | Channels) -> None:
        """``param`` is only permuted with x's channels (a running variance)."""
        self._use(param, dim, "permuted", _channels(x))

    def _use(self, param: ParamRef | SlicedParam, dim: int | None, role: str, ch: Channels,
             inner: Channels | None = None) -> None:
        span = param.span if isinstance(param, SlicedParam) else None
        self._uses.append(ParamUse(param.name, dim, role, ch, inner, span))

    def activation(self, node: fx.Node, x: Layout, group, *, site: str | None = None) -> Layout:
        """The output of an elementwise activation of ``x`` with intertwiner group ``group`` (a
        :class:`~intertwiners.groups.IntertwinerGroup`, or anything :func:`~intertwiners.intertwiner_group`
        takes: a name, a module, a callable), recorded as an activation site named ``site`` (default: the
        enclosing module and the operation, ``"block:myop"``). The output has ``node``'s shape."""
        if site is None:
            path, _ = owner(node)
            site = self.site_name(f"{path}:{getattr(node.target, '__name__', str(node.target)).split('.')[0]}")
        if not isinstance(group, G.IntertwinerGroup):
            group = G.intertwiner_group(group)
        key = self.register_group(group.name, group)
        self.record_site(site, x, key)
        return self.through_activation(node, x, key)

    def through_activation(self, node: fx.Node, x: Layout, key: str) -> Layout:
        """x after the activation whose group is registered under ``key`` (no site recorded)."""
        group = self._groups[key]
        shape = shape_of(node)
        if group.kind == "general_linear":  # sigma(x) = a·x commutes with every linear map: nothing changes
            return x if x.shape == tuple(shape) else broadcast_to(x, shape)
        self.require(Activation, x, key)
        zero_stays = group.sigma0 is not None and group.sigma0 == 0.0
        atoms = x.atoms if zero_stays else np.where(x.atoms == ZERO, FIXED, x.atoms)
        side = x.side
        if side is not None:   # hidden units along another axis go through the same activation
            self.require(Activation, Channels(side.atoms, side.chains), key)
            side = Side(side.dim, side.atoms, self.extend_chains(side.chains, key))
            self.keep(simple(side.atoms, side.chains, (len(side.atoms),), 0))
        base = x if x.shape == tuple(shape) else broadcast_to(x, shape)
        return base.derive(atoms=atoms, chains=self.extend_chains(x.chains, key), side=side)

    def pin(self, x: Layout | Channels, reason: str) -> None:
        """Fix x's channels to the identity, with the reason."""
        self.atoms.pin(_channels(x).atoms, reason)

    def pin_side(self, x: Layout, node: fx.Node) -> None:
        """Fix the units of x's side axis (``node`` reads them in a way no rule follows)."""
        if x.side is not None:
            self.pin(x.side_channels, f"{self.describe(node)} reads hidden units along a non-channel axis")

    def unsupported(self, node: fx.Node, reason: str | None = None) -> None:
        """Pin every hidden input of ``node`` (default reason: the operation is not supported) and their side
        axes; the output is then an untransformed tensor (None)."""
        why = reason or f"operation {self.describe(node)} is not supported"
        for lay in self.hidden_inputs(node):
            self.pin(lay, why)
            self.pin_side(lay, node)
        return None

    # -- bookkeeping for the built-in families ----------------------------------------------------------------
    def chain_id(self, chain: tuple) -> int:
        if chain not in self._chain_ids:
            self._chain_ids[chain] = len(self._chains)
            self._chains.append(chain)
        return self._chain_ids[chain]

    def chain(self, cid: int) -> tuple:
        return self._chains[int(cid)]

    def extend_chains(self, chains: np.ndarray, entry) -> np.ndarray:
        """Chain ids with ``entry`` appended to each."""
        out = chains.copy()
        for cid in np.unique(chains).tolist():
            out[chains == cid] = self.chain_id(self._chains[cid] + (entry,))
        return out

    def register_group(self, name: str, group) -> str:
        """The key of an activation group (``name``, or ``name#k`` when another group has that name)."""
        key, k = name, 1
        while key in self._groups and self._groups[key] is not group:
            key, k = f"{name}#{k}", k + 1
        self._groups[key] = group
        return key

    def site_name(self, base: str) -> str:
        """``base`` for its first occurrence, ``base#k`` for the k-th repeat (a module called again)."""
        k = self._site_counts[base]
        self._site_counts[base] += 1
        return base if k == 0 else f"{base}#{k}"

    def record_site(self, name: str, x: Layout, key: str | None = None) -> None:
        self._sites.append(SiteRecord(name, x, key))

    def record_attention(self, record: AttentionRecord) -> None:
        self._attention.append(record)

    def mark_output(self, x: Layout) -> None:
        self._outputs.append(x.atoms[x.atoms >= 0])
        self.pin(x, "the model's output")

    @property
    def uses(self) -> tuple[ParamUse, ...]:
        """The parameter uses recorded so far."""
        return tuple(self._uses)

    def result(self, lowest_cast=None) -> Analysis:
        roots, parity = self.atoms.resolved()
        outputs = np.unique(np.concatenate(self._outputs)) if self._outputs else np.zeros(0, np.int64)
        return Analysis(tuple(self._values), roots, parity, self.atoms.pins(), outputs.astype(np.int64),
                        tuple(self._chains), dict(self._groups),
                        tuple(self._requirements), tuple(self._ties), tuple(self._uses), tuple(self._sites),
                        tuple(self._attention), lowest_cast)

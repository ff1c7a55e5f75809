"""Where the channels of a hidden value sit in its tensor: channel *atoms* and tensor *factors*.

A hidden value (a tensor the symmetry acts on) is described by a :class:`Layout`:

* ``atoms`` — one entry per feature (channel) of the value, in *feature order*: an atom id (>= 0, the
  identity of a channel; atoms are later joined into classes and spaces), or ``ZERO`` (a channel known to
  be zero, e.g. zero padding) or ``FIXED`` (a channel that is never transformed);
* ``chains`` — per feature, the id of the chain of scale maps the value carries (see
  :mod:`intertwiners.symmetries.constraints`);
* ``fsizes`` — the feature axes (major to minor): ``atoms`` is the flattening of an array of this shape;
* ``dims`` — for every tensor dimension, its *factors* (major to minor), each ``(size, f)`` with ``f`` the
  feature axis it holds or -1 for a non-feature factor (batch, tokens, pixels, broadcast copies).

So ``view``/``reshape``/``transpose``/``permute``/``unsqueeze``/``expand``/``select`` only move factors
around (heads split off the channel axis, the batch merged with heads as in ``nn.MultiheadAttention``,
a feature map flattened into a linear layer's input) and never lose track of a channel.
:func:`atoms_along` reads the atoms seen along chosen tensor dimensions (e.g. a linear layer's input
columns, where a flattened feature map repeats each channel once per pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZERO = -1    # a channel known to be zero (zero channel padding)
FIXED = -2   # a channel that is never transformed


@dataclass(frozen=True, eq=False)
class Channels:
    """The channels at the positions of one tensor axis (or of a flattened tensor): ``atoms`` (L,) atom ids
    (or ``ZERO``/``FIXED``) and ``chains`` (L,) chain ids, position by position (repeats allowed)."""
    atoms: np.ndarray
    chains: np.ndarray

    @staticmethod
    def fixed(n: int) -> Channels:
        """``n`` untransformed channels (an input no transform reaches, a parameter's axis that stays)."""
        return Channels(np.full(n, FIXED, np.int64), np.zeros(n, np.int64))


@dataclass(frozen=True, eq=False)
class Side:
    """Hidden units along an axis without channels (MLP-Mixer's token mixing): tensor dimension ``dim``
    holds ``atoms`` (J,) with ``chains`` (J,), a space of their own next to the value's channels."""
    dim: int
    atoms: np.ndarray
    chains: np.ndarray


_KEEP = object()


@dataclass(eq=False)
class Layout:
    """Where a hidden value's channels sit (see the module docstring): ``atoms``/``chains`` (F,) in feature
    order, ``fsizes`` the feature axes (prod = F), ``dims`` the factors of every tensor dimension, ``side``
    optional hidden units along a non-channel axis (:class:`Side`)."""
    atoms: np.ndarray
    chains: np.ndarray
    fsizes: tuple
    dims: tuple  # tuple[tuple[tuple[int, int], ...], ...]
    side: Side | None = None

    @property
    def channels(self) -> Channels:
        """The channels in feature order."""
        return Channels(self.atoms, self.chains)

    @property
    def side_channels(self) -> Channels | None:
        """The units of the side axis, if there is one."""
        return None if self.side is None else Channels(self.side.atoms, self.side.chains)

    @property
    def shape(self) -> tuple:
        return tuple(int(np.prod([s for s, _ in d])) if d else 1 for d in self.dims)

    @property
    def ndim(self) -> int:
        return len(self.dims)

    def derive(self, atoms=None, chains=None, fsizes=None, dims=None, side=_KEEP) -> Layout:
        return Layout(self.atoms if atoms is None else atoms, self.chains if chains is None else chains,
                      self.fsizes if fsizes is None else fsizes, self.dims if dims is None else dims,
                      self.side if side is _KEEP else side)

    def feature_dims(self) -> list[int]:
        return [i for i, d in enumerate(self.dims) if any(f >= 0 for _, f in d)]

    def simple_dim(self) -> int | None:
        """The tensor dimension holding every feature factor in order and nothing else, if there is one."""
        fd = self.feature_dims()
        if len(fd) != 1:
            return None
        facs = [f for s, f in self.dims[fd[0]] if s != 1 or f >= 0]
        return fd[0] if facs == list(range(len(self.fsizes))) else None


def simple(atoms: np.ndarray, chains: np.ndarray, shape: tuple, dim: int) -> Layout:
    """A fresh layout with all channels on tensor dimension ``dim`` of ``shape``."""
    dims = tuple(((int(s), 0),) if i == dim else (((int(s), -1),) if s != 1 else ()) for i, s in enumerate(shape))
    return Layout(atoms, chains, (int(shape[dim]),), dims)


def _strides(fsizes) -> list[int]:
    out, acc = [], 1
    for s in reversed(fsizes):
        out.append(acc)
        acc *= s
    return out[::-1]


def feature_index(lay: Layout, dims: list[int]) -> np.ndarray | None:
    """For each index combination of tensor ``dims``, the flat feature index there; None if some feature
    factor lies outside ``dims``."""
    held = {f for d in dims for _, f in lay.dims[d] if f >= 0}
    if held != set(range(len(lay.fsizes))):
        return None
    strides = _strides(lay.fsizes)
    parts = []
    for d in dims:
        size = lay.shape[d]
        idx = np.arange(size)
        contrib = np.zeros(size, dtype=np.int64)
        rem = idx.copy()
        for s, f in reversed(lay.dims[d]):
            digit = rem % s
            rem = rem // s
            if f >= 0:
                contrib += digit * strides[f]
        parts.append(contrib)
    grids = np.ix_(*parts) if len(parts) > 1 else (parts[0],)
    total = np.zeros([len(p) for p in parts], dtype=np.int64)
    for g in grids:
        total = total + g
    return total


def atoms_along(lay: Layout, dims: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(atoms, chains) as arrays over the index combinations of ``dims`` (None if features lie elsewhere)."""
    idx = feature_index(lay, dims)
    if idx is None:
        return None
    return lay.atoms[idx], lay.chains[idx]


def reshape(lay: Layout, new_shape: tuple) -> Layout | None:
    """The layout after a view/reshape to ``new_shape`` (None when factors cannot be matched). When the factors
    do not match one by one, consecutive factors without channels (adjacent in the flattened order) are merged
    first, which lets a reshape regroup positions freely where they hold no channel (XLNet's relative shift,
    (B, H, I, J) -> (B, H, J, I) with channels on H only)."""
    def queue():
        return [list(f) for d in lay.dims for f in d if f[0] != 1]
    return _reshape(lay, new_shape, queue()) or _reshape(lay, new_shape, _merged(queue()))


def _merged(queue: list) -> list:
    """Factors in flattened order with every run of consecutive non-channel factors merged into one."""
    out = []
    for s, f in queue:
        if f < 0 and out and out[-1][1] < 0:
            out[-1][0] *= s
        else:
            out.append([s, f])
    return out


def _reshape(lay: Layout, new_shape: tuple, queue: list) -> Layout | None:
    fsizes = list(lay.fsizes)
    out = []
    for S in new_shape:
        need, facs = int(S), []
        while need > 1:
            if not queue:
                return None
            s, f = queue[0]
            if need % s == 0:
                facs.append((s, f))
                queue.pop(0)
                need //= s
            elif s % need == 0:
                if f >= 0:  # split feature axis f into (need, s // need)
                    fsizes[f:f + 1] = [need, s // need]
                    for q in queue[1:]:
                        if q[1] > f:
                            q[1] += 1
                    for d in out:
                        for i, (s2, f2) in enumerate(d):
                            if f2 > f:
                                d[i] = (s2, f2 + 1)
                    for i, (s2, f2) in enumerate(facs):
                        if f2 > f:
                            facs[i] = (s2, f2 + 1)
                    facs.append((need, f))
                    queue[0] = [s // need, f + 1]
                else:
                    facs.append((need, -1))
                    queue[0] = [s // need, -1]
                need = 1
            else:
                return None
        out.append(facs)
    if queue:
        return None
    return lay.derive(fsizes=tuple(fsizes), dims=tuple(tuple(d) for d in out))


def _move_side(side: Side | None, where) -> Side | None:
    """The side axis at its new dimension (``where(dim)``; None drops it)."""
    if side is None:
        return None
    dim = where(side.dim)
    return None if dim is None else Side(dim, side.atoms, side.chains)


def permute(lay: Layout, order: list[int]) -> Layout:
    return lay.derive(dims=tuple(lay.dims[i] for i in order), side=_move_side(lay.side, order.index))


def unsqueeze(lay: Layout, dim: int) -> Layout:
    dims = list(lay.dims)
    dims.insert(dim, ())
    return lay.derive(dims=tuple(dims), side=_move_side(lay.side, lambda d: d + (d >= dim)))


def squeeze(lay: Layout, dims_to_remove: list[int]) -> Layout:
    return lay.derive(dims=tuple(d for i, d in enumerate(lay.dims) if i not in dims_to_remove),
                      side=_move_side(lay.side, lambda d: None if d in dims_to_remove
                                      else d - sum(r < d for r in dims_to_remove)))


def with_non_feature_size(lay: Layout, dim: int, size: int) -> Layout:
    """Dimension ``dim`` (without features) gets a new size (slicing, pooling, broadcasting)."""
    dims = list(lay.dims)
    dims[dim] = ((int(size), -1),) if size != 1 else ()
    return lay.derive(dims=tuple(dims))


def _features_in_order(lay: Layout, group: list) -> Layout:
    """The same layout with its feature axes renumbered so that ``group`` (a permutation of consecutive feature
    axes, as one tensor dimension holds them after a transpose) comes in the order the dimension holds it: the
    atoms/chains are transposed to match, every tensor position keeps its channel."""
    lo = min(group)
    perm = list(range(len(lay.fsizes)))
    perm[lo:lo + len(group)] = group             # new feature axis i is old axis perm[i]
    inv = {old: new for new, old in enumerate(perm)}
    fsizes = tuple(lay.fsizes[p] for p in perm)
    atoms = np.ascontiguousarray(lay.atoms.reshape(lay.fsizes).transpose(perm)).reshape(-1)
    chains = np.ascontiguousarray(lay.chains.reshape(lay.fsizes).transpose(perm)).reshape(-1)
    dims = tuple(tuple((s, inv[f] if f >= 0 else f) for s, f in d) for d in lay.dims)
    return lay.derive(atoms=atoms, chains=chains, fsizes=fsizes, dims=dims)


def index_feature_dim(lay: Layout, dim: int, index) -> Layout | None:
    """Slice/select along a dimension made only of feature factors (``index``: a slice, an int or an array).

    The feature axes of that dimension are merged into one, indexed, and the result replaces them
    (an int removes the dimension).
    """
    facs = [f for f in lay.dims[dim]]
    fids = [f for _, f in facs]
    if not facs or any(f < 0 for f in fids):
        return None
    if fids != list(range(fids[0], fids[0] + len(fids))):
        if sorted(fids) != list(range(min(fids), min(fids) + len(fids))):
            return None
        lay = _features_in_order(lay, fids)   # a channel shuffle's transposed factors (ShuffleNet)
        facs = [f for f in lay.dims[dim]]
        fids = [f for _, f in facs]
    lo, hi = fids[0], fids[-1] + 1
    shape = list(lay.fsizes)
    merged = int(np.prod(shape[lo:hi]))
    arr_a = lay.atoms.reshape(shape[:lo] + [merged] + shape[hi:])
    arr_c = lay.chains.reshape(arr_a.shape)
    sel = (slice(None),) * lo + (index,)
    arr_a, arr_c = arr_a[sel], arr_c[sel]
    fsizes = list(arr_a.shape)
    removed = isinstance(index, int | np.integer)
    shift = (hi - lo) - (0 if removed else 1)
    dims = []
    for i, d in enumerate(lay.dims):
        if i == dim:
            if not removed:
                dims.append(((fsizes[lo], lo),) if fsizes[lo] != 1 or True else ())
            continue
        dims.append(tuple((s, f - shift if f >= hi else f) for s, f in d))
    return Layout(np.ascontiguousarray(arr_a).reshape(-1), np.ascontiguousarray(arr_c).reshape(-1),
                  tuple(fsizes), tuple(dims))


def first_along(lay: Layout, faxes: set) -> Channels:
    """``lay``'s channels (feature order) with every coordinate of the feature axes ``faxes`` replaced by the
    first one: the channel each position is tied to when the channels along ``faxes`` become one."""
    A, C = lay.atoms.reshape(lay.fsizes), lay.chains.reshape(lay.fsizes)
    first = tuple(slice(0, 1) if f in faxes else slice(None) for f in range(len(lay.fsizes)))
    return Channels(np.broadcast_to(A[first], A.shape).reshape(-1), np.broadcast_to(C[first], C.shape).reshape(-1))


def drop_feature_dims(lay: Layout, dims) -> Layout | None:
    """``lay`` with the tensor dimensions ``dims`` reduced to size 1, the feature axes they hold dropped (each
    row along them keeps its first channel: the caller has tied the rows, see :func:`first_along`); None when
    one of those feature axes also lies in another dimension, or when no channel axis would be left."""
    dims = set(dims)
    gone = {f for d in dims for _, f in lay.dims[d] if f >= 0}
    kept = [f for f in range(len(lay.fsizes)) if f not in gone]
    if not kept or any(f in gone for d, facs in enumerate(lay.dims) if d not in dims for _, f in facs):
        return None
    first = tuple(0 if f in gone else slice(None) for f in range(len(lay.fsizes)))
    new = {f: i for i, f in enumerate(kept)}
    return Layout(np.ascontiguousarray(lay.atoms.reshape(lay.fsizes)[first]).reshape(-1),
                  np.ascontiguousarray(lay.chains.reshape(lay.fsizes)[first]).reshape(-1),
                  tuple(lay.fsizes[f] for f in kept),
                  tuple(() if d in dims else tuple((s, new[f] if f >= 0 else f) for s, f in facs)
                        for d, facs in enumerate(lay.dims)), _move_side(lay.side, lambda d: None if d in dims else d))


def stack_features(parts: list[Layout], dim: int) -> Layout:
    """Layouts of the same structure stacked along a new tensor dimension ``dim`` that becomes a feature axis of
    its own (the last one): position k of it holds part k's channels."""
    ref = parts[0]
    shape = (*ref.fsizes, len(parts))
    atoms = np.stack([p.atoms.reshape(ref.fsizes) for p in parts], -1).reshape(-1)
    chains = np.stack([p.chains.reshape(ref.fsizes) for p in parts], -1).reshape(-1)
    dims = list(ref.dims)
    dims.insert(dim, ((len(parts), len(ref.fsizes)),))
    return Layout(atoms, chains, shape, tuple(dims), _move_side(ref.side, lambda d: d + (d >= dim)))


def merged_features(lay: Layout) -> Layout:
    """The same layout with every run of consecutive feature axes that one tensor dimension holds in order (f,
    f+1, ...: a pair stacked and reshaped back into the head width) merged into one feature axis. The feature
    order, and so ``atoms`` and ``chains``, do not change."""
    runs = []   # [first axis, last axis] of each run
    for facs in lay.dims:
        before = None   # the factor just before, in this dimension
        for _, f in facs:
            if f >= 0 and before is not None and before == f - 1 and runs[-1][1] == f - 1:
                runs[-1][1] = f
            elif f >= 0:
                runs.append([f, f])
            before = f if f >= 0 else None
    if len(runs) == len(lay.fsizes):
        return lay
    new_of, fsizes = {}, []
    for i, (lo, hi) in enumerate(sorted(runs)):
        fsizes.append(int(np.prod(lay.fsizes[lo:hi + 1])))
        new_of.update({f: i for f in range(lo, hi + 1)})
    dims = []
    for facs in lay.dims:
        out = []
        for size, f in facs:
            if f >= 0 and out and out[-1][1] == new_of[f]:
                out[-1] = (out[-1][0] * size, new_of[f])
            else:
                out.append((size, new_of[f] if f >= 0 else f))
        dims.append(tuple(out))
    return lay.derive(fsizes=tuple(fsizes), dims=tuple(dims))


def same_structure(a: Layout, b: Layout) -> bool:
    """Do ``a`` and ``b`` hold their features at the same tensor positions (broadcast dims aside)? Feature axes
    that one dimension holds in order count as one (:func:`merged_features`)."""
    if a.fsizes != b.fsizes:
        a, b = merged_features(a), merged_features(b)
    if a.fsizes != b.fsizes or a.ndim != b.ndim:
        return False
    for da, db in zip(a.dims, b.dims):
        fa = [x for x in da if x[1] >= 0 or x[0] != 1]
        fb = [x for x in db if x[1] >= 0 or x[0] != 1]
        if any(f >= 0 for _, f in fa) or any(f >= 0 for _, f in fb):
            if fa != fb:
                return False
    return True


def merge_tied(a: Layout, b: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(atoms, chains) of a value whose every channel holds ``a``'s channel or ``b``'s at the same position
    (a sum, a concatenation along another axis), once the two are tied: a's atom, else b's, else FIXED if
    either is untransformed, else ZERO."""
    atoms = np.where(a.atoms >= 0, a.atoms, np.where(b.atoms >= 0, b.atoms, np.where(
        (a.atoms == FIXED) | (b.atoms == FIXED), FIXED, ZERO)))
    return atoms, np.where(a.atoms >= 0, a.chains, b.chains)


def broadcast_to(x: Layout, shape) -> Layout:
    """x broadcast to ``shape`` (leading dimensions added, non-channel dimensions resized)."""
    out = x
    while out.ndim < len(shape):
        out = unsqueeze(out, 0)
    for d, s in enumerate(shape):
        if out.shape[d] != s:
            out = with_non_feature_size(out, d, s)
    return out

"""Attention: ``scaled_dot_product_attention`` and attention written out (``softmax(q @ k^T) @ v``).

Per head, queries and keys are tied with a dual transform (W_Q -> A W_Q, W_K -> A^-T W_K); the output
carries the values' transform (W_V -> B W_V, W_O -> W_O B^-1); heads are permuted together. Each call is
recorded (:class:`~..records.AttentionRecord`); the resolver turns its query/key and value spaces into one
attention space (:class:`~..structured.AttentionGroup`).

Written out, the scores ``q @ k^T`` carry *head atoms*, which only a permutation of the heads may move.
Scores that never reach ``p @ v`` with those head atoms (talking heads: a linear map across the head axis
mixes them) keep their heads in place; their queries and keys keep the per-head maps A_g (the scores of a
head do not change under them, whatever reads them), and the values keep B_g when the mixed weights meet
them head by head.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from .. import layout as L
from ..capture import owner
from ..context import Context
from ..layout import Layout
from ..records import AttentionRecord
from ..registry import builtin, finisher

aten = torch.ops.aten


def _whole_heads(ctx: Context, node: fx.Node, table: np.ndarray) -> None:
    """Partial rotary embeddings (GPT-NeoX, Phi) tie the rotated channels of a head but not the others: tie
    the whole head then (one scalar per head on queries/keys, a subgroup of the true blockdiag(c·I, GL))."""
    for row in table:
        row = row[row >= 0]
        if len(row) > 1 and 1 < len({ctx.atoms.find(int(a))[0] for a in row}) < len(row):
            ctx.atoms.union_arrays(row, np.full_like(row, row[0]), 0, f"{ctx.describe(node)} (partially rotated head)")


def tie_queries_keys(ctx: Context, node: fx.Node, qa, qc, ka, kc, repeat: bool):
    """Tie query and key channels per head with a dual transform; keys of fewer heads are repeated when
    ``repeat`` (grouped-query attention). (queries, keys) tables (H, dk), or the reason they cannot be tied."""
    _whole_heads(ctx, node, qa)
    _whole_heads(ctx, node, ka)
    if repeat and ka.shape[0] != qa.shape[0] and ka.shape[0] and qa.shape[0] % ka.shape[0] == 0:
        ka, kc = (np.repeat(t, qa.shape[0] // ka.shape[0], 0) for t in (ka, kc))
    if ka.shape != qa.shape:
        return "unexpected head shapes"
    if not np.array_equal(qc, kc):
        return "queries and keys carry different transforms"
    ctx.atoms.union_arrays(qa.reshape(-1), ka.reshape(-1), 1, f"{ctx.describe(node)}")
    return qa, ka


def _record(ctx: Context, node: fx.Node, qa, ka, va, heads=None) -> None:
    path, _ = owner(node)
    name = f"{path or 'model'}.attention" if not path.endswith("attention") else path
    kv = va if va is not None else ka
    ctx.record_attention(AttentionRecord(name, qa, ka, va, len({tuple(r) for r in kv.tolist()}), heads))


def _heads_table(t: Layout):
    """(atoms, chains) per (head, head width) of a (..., heads, tokens, width) value, or None."""
    return L.atoms_along(t, [t.ndim - 3, t.ndim - 1])


@builtin(aten.scaled_dot_product_attention)
def sdpa(ctx: Context, node: fx.Node):
    """softmax(q k^T / s + mask) v per head: (q, k) -> (A q, A^-T k) and v -> B v per head, heads permuted
    together. Keys are tied to queries with a dual transform; the output carries the values' transform. A mask
    that is a hidden value with channels on the head axis (a per-head bias from a parameter table, Swin's and
    BEiT's relative position bias) is recorded as the block's head atoms: the resolver permutes the table's
    head axis with the heads, or keeps the heads in place (the table shared by several blocks, as T5's)."""
    q, k, v = (ctx.value(a) for a in node.args[:3])
    mask_arg = ctx.arg(node, 3, "attn_mask")
    shape = ctx.shape(node)
    if mask_arg is None and all(isinstance(t, Layout) for t in (q, k, v)):
        return heads_before_tokens(ctx, node, lambda q, k, v, shape: _sdpa(ctx, node, q, k, v, None, shape),
                                   (q, k, v), shape)
    return _sdpa(ctx, node, q, k, v, mask_arg, shape)


def heads_before_tokens(ctx: Context, node: fx.Node, product, operands: tuple, shape):
    """``product(*operands, shape)`` with the operands' head axis moved to just before their tokens when it lies
    further out (Hiera's mask-unit attention: (batch, heads, windows, tokens, width)), and the result's moved
    back: a batched product treats every axis before the last two alike, so moving one of them is exact."""
    nd = operands[0].ndim
    lead = {d for x in operands for d in x.feature_dims() if d < nd - 2}
    if len(lead) != 1 or shape is None or any(x.ndim != nd for x in operands) or min(lead) >= nd - 3:
        return product(*operands, shape)
    order = [d for d in range(nd) if d not in lead]
    order.insert(nd - 3, lead.pop())
    out = product(*(L.permute(x, order) for x in operands), tuple(shape[d] for d in order))
    return L.permute(out, np.argsort(order).tolist()) if isinstance(out, Layout) else out


def _sdpa(ctx: Context, node: fx.Node, q, k, v, mask_arg, shape):
    mask = ctx.value(mask_arg)
    heads = None
    if isinstance(mask, Layout):   # a per-head bias computed from parameters (T5's relative position bias)
        if mask.simple_dim() != mask.ndim - 3:
            return ctx.unsupported(node, f"{ctx.describe(node)}: a mask with channels outside the head axis")
        heads = mask.atoms
    elif _varies_across_heads(ctx, mask_arg, shape):   # an untransformed per-head bias (ALiBi, a bias table)
        H = shape[-3]
        heads = ctx.keep(L.simple(ctx.atoms.new(H), np.zeros(H, np.int64), (H,), 0)).atoms
        ctx.atoms.pin(heads, f"{ctx.describe(node)}: a mask that differs between heads (e.g. ALiBi) keeps the heads "
                             "in place")
    if isinstance(v, Layout) and q is None and k is None:
        if heads is not None and isinstance(mask, Layout):
            ctx.pin(mask, f"{ctx.describe(node)}: a per-head attention bias with untransformed queries and keys "
                          "keeps the heads in place")
        got = _heads_table(v)
        if got is None:
            return ctx.unsupported(node, f"{ctx.describe(node)}: channels outside the head and head-width axes")
        va = got[0]
        H = (shape or v.shape)[-3]
        if va.shape[0] != H:
            va = np.repeat(va, H // va.shape[0], 0)
        _record(ctx, node, None, None, va)
        return L.with_non_feature_size(v, v.ndim - 2, shape[-2])
    if not all(isinstance(t, Layout) for t in (q, k, v)):
        return ctx.unsupported(node, f"{ctx.describe(node)}: queries, keys and values must all be hidden values")
    tables = [_heads_table(t) for t in (q, k, v)]
    if any(t is None for t in tables):
        return ctx.unsupported(node, f"{ctx.describe(node)}: channels outside the head and head-width axes")
    (qa, qc), (ka, kc), (va, _) = tables
    gqa = node.kwargs.get("enable_gqa", False)
    if gqa and va.shape[0] != qa.shape[0]:
        va = np.repeat(va, qa.shape[0] // va.shape[0], 0)
    if va.shape[0] != qa.shape[0]:
        return ctx.unsupported(node, f"{ctx.describe(node)}: unexpected head shapes")
    if heads is not None and len(heads) != qa.shape[0]:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a per-head mask with other heads than the queries")
    tied = tie_queries_keys(ctx, node, qa, qc, ka, kc, repeat=gqa)
    if isinstance(tied, str):
        return ctx.unsupported(node, f"{ctx.describe(node)}: {tied}")
    _record(ctx, node, tied[0], tied[1], va, heads=heads)
    out = v
    if v.shape != tuple(shape):
        out = L.with_non_feature_size(v, v.ndim - 2, shape[-2])
        if out.shape != tuple(shape):
            return ctx.unsupported(node, f"{ctx.describe(node)}: unexpected output shape")
    return out


def weights_times_values(ctx: Context, node: fx.Node, weights_arg, v: Layout):
    """``p @ v`` with ``p`` untransformed (attention weights whose scores were pinned or not followed, a fixed
    mixing of tokens) and v hidden, its channels not on the contracted axis. When p is the same for every head
    of v (or v has no head axis) the product commutes with any transform of v: channels pass. When p differs
    between heads, head h of the output is p[h] @ v[h]: the values keep per-head maps B_g (recorded as an
    attention block without queries/keys; no head permutation)."""
    shape, ps = ctx.shape(node), ctx.shape(weights_arg)
    nd = v.ndim
    if shape is None or ps is None or nd < 2 or (nd - 2) in v.feature_dims():
        return ctx.unsupported(node, f"{ctx.describe(node)}: a product that mixes channels with other values")
    folded = [s for s, _ in v.dims[0]] if nd == 3 else []
    if len(folded) > 1 and len(ps) == 3 and ps[0] in (1, v.shape[0]):   # heads folded into the batch axis
        v4 = L.reshape(v, (*folded, *v.shape[1:]))
        p4 = (*(folded if ps[0] != 1 else [1] * len(folded)), *ps[1:])
        out = _weights_times_values(ctx, node, p4, v4, (*folded, *shape[1:])) if v4 is not None else None
        back = L.reshape(out, tuple(shape)) if isinstance(out, Layout) else None
        return back if back is not None else ctx.unsupported(node, f"{ctx.describe(node)}: unexpected layout")
    return _weights_times_values(ctx, node, ps, v, tuple(shape))


def _weights_times_values(ctx: Context, node: fx.Node, ps: tuple, v: Layout, shape: tuple):
    nd = v.ndim
    ps = (1,) * (nd - len(ps)) + tuple(ps)
    lead = [d for d in v.feature_dims() if d != nd - 1]
    out = L.with_non_feature_size(v, nd - 2, shape[nd - 2])
    if all(ps[d] == 1 for d in lead):
        return out
    got = _heads_table(v) if nd >= 3 and lead == [nd - 3] else None
    if got is None:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a product with weights that differ along channel axes")
    _record(ctx, node, None, None, got[0])
    return out


def _varies_across_heads(ctx: Context, mask_arg, shape) -> bool:
    """Does the (untransformed) mask of an attention call differ between the heads of its output ``shape``?"""
    ms = ctx.shape(mask_arg) if isinstance(mask_arg, fx.Node) else None
    if ms is None or shape is None or len(shape) < 3:
        return False
    ms = (1,) * (len(shape) - len(ms)) + tuple(ms)
    return ms[-3] > 1


def batched_attention_product(ctx: Context, node: fx.Node, a: Layout, b: Layout, shape: tuple | None = None):
    """A product of two hidden values (``matmul``, ``bmm``; ``shape``: the product's shape, default the node's).
    With the heads folded into the batch axis, (batch·heads, tokens, width) as XGLM, BART and BLOOM write
    attention with ``bmm``, that axis is unfolded into its factors, the product read by
    :func:`attention_product` and the result folded back."""
    shape = shape or ctx.shape(node)
    folded = [s for s, _ in a.dims[0]]
    if a.ndim != 3 or len(folded) < 2 or shape is None:
        return attention_product(ctx, node, a, b, shape)
    if [s for s, _ in b.dims[0]] != folded:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a batched product whose operands fold their batch "
                                     "axes differently")
    a4, b4 = L.reshape(a, (*folded, *a.shape[1:])), L.reshape(b, (*folded, *b.shape[1:]))
    if a4 is None or b4 is None:   # pragma: no cover - unfolding a dimension into its own factors always matches
        return ctx.unsupported(node, f"{ctx.describe(node)}: unexpected batch layout")
    out = attention_product(ctx, node, a4, b4, (*folded, *shape[1:]))
    if not isinstance(out, Layout):
        return out
    back = L.reshape(out, tuple(shape))
    if back is None:   # pragma: no cover - unfolding and folding back the same factors always matches
        return ctx.unsupported(node, f"{ctx.describe(node)}: unexpected output layout")
    return back


def attention_product(ctx: Context, node: fx.Node, a: Layout, b: Layout, shape: tuple | None = None):
    """A product of two hidden values (``matmul``): attention written out on (..., heads, tokens, width).

    ``q @ k^T`` contracts the head width of queries and keys: they are tied with a dual transform per head
    and the scores get fresh *head atoms* on their head axis. ``p @ v`` with ``p`` holding such head atoms
    records the attention block (queries, keys, values and the head atoms, which the resolver checks:
    nothing else may read the scores)."""
    nd = a.ndim
    shape = shape or ctx.shape(node)
    if nd == 2 and b.ndim == 2 and a.feature_dims() == [1] and b.feature_dims() == [0]:
        return bilinear_form(ctx, node, a, b)
    return heads_before_tokens(ctx, node, lambda a, b, shape: _attention_product(ctx, node, a, b, shape), (a, b),
                               shape)


def _attention_product(ctx: Context, node: fx.Node, a: Layout, b: Layout, shape):
    nd = a.ndim
    scores = _pending(ctx)
    if nd < 3 or b.ndim != nd or shape is None:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a product of hidden values that is not attention")
    fa, fb = set(a.feature_dims()), set(b.feature_dims())
    if nd - 1 in fa and nd - 2 not in fa and nd - 2 in fb and nd - 1 not in fb:       # q @ k^T
        q, k = L.atoms_along(a, [nd - 3, nd - 1]), L.atoms_along(b, [nd - 3, nd - 2])
        if q is None or k is None:
            return ctx.unsupported(node, f"{ctx.describe(node)}: channels outside the head and head-width axes")
        tied = tie_queries_keys(ctx, node, q[0], q[1], k[0], k[1], repeat=True)
        if isinstance(tied, str):
            return ctx.unsupported(node, f"{ctx.describe(node)}: {tied}")
        heads = ctx.atoms.new(tied[0].shape[0])
        scores[int(heads[0])] = (*tied, heads, node)
        return L.simple(heads, np.zeros(len(heads), np.int64), shape, nd - 3)
    if fa == {nd - 3} and a.simple_dim() == nd - 3 and int(a.atoms[0]) not in scores \
            and nd - 1 in fb and nd - 2 not in fb:                                         # mixed p @ v
        return _mixed_weights_times_values(ctx, node, a, b, shape)
    if fa == {nd - 3} and a.simple_dim() == nd - 3 and int(a.atoms[0]) in scores \
            and nd - 1 in fb and nd - 2 not in fb:                                         # p @ v
        # checked before the scores leave the pending ones: scores whose p @ v cannot be followed stay pending,
        # and the finisher records their queries/keys with the heads in place (queries and keys tied per head
        # but recorded nowhere would read as one space across heads)
        qa, ka, _, _ = scores[int(a.atoms[0])]
        got = _heads_table(b)
        if got is None:
            return ctx.unsupported(node, f"{ctx.describe(node)}: channels outside the head and head-width axes")
        va = got[0]
        H = qa.shape[0]
        if va.shape[0] != H and va.shape[0] and H % va.shape[0] == 0:
            va = np.repeat(va, H // va.shape[0], 0)
        if va.shape[0] != H or len(a.atoms) != H:
            return ctx.unsupported(node, f"{ctx.describe(node)}: unexpected head shapes")
        del scores[int(a.atoms[0])]
        _merge_added_scores(ctx, scores, a.atoms, qa, ka)
        _record(ctx, node, qa, ka, va, heads=a.atoms)
        return L.with_non_feature_size(b, nd - 2, shape[nd - 2])
    if fa <= {nd - 2, nd - 1} and fb == {nd - 1} and not set(a.atoms.tolist()) & set(scores):
        # weights computed from hidden values that mix b along an axis without channels (hyper-connections'
        # stream mixing ``comb^T @ streams``, (B, T, n, n) @ (B, T, n, d)): the weights' units stay untransformed
        ctx.pin(a, f"{ctx.describe(node)}: weights that mix values along an axis without channels")
        return weights_times_values(ctx, node, node.args[0], b)
    return ctx.unsupported(node, f"{ctx.describe(node)}: a product of hidden values that is not attention")


def bilinear_form(ctx: Context, node: fx.Node, a: Layout, b: Layout):
    """``a @ b`` of two matrices whose only channels are the ones the product contracts (CLIP's similarities of
    two towers' embeddings, ``image_embeds @ text_embeds.T``): ``a`` (n, C) -> a A^T and ``b`` (C, m) ->
    A^-T b leave every entry a_i · b_j unchanged, so the two sides are tied with a dual transform (one space
    for both towers' projections) and the result is untransformed. Different scalings on the two sides
    (another chain of activations) cannot be tied: pinned."""
    (aa, ac), (ba, bc) = L.atoms_along(a, [1]), L.atoms_along(b, [0])
    if len(aa) != len(ba) or not np.array_equal(ac, bc):
        return ctx.unsupported(node, f"{ctx.describe(node)}: a product of hidden values whose contracted channels "
                                     "carry different transforms")
    ctx.atoms.union_arrays(aa, ba, 1, f"{ctx.describe(node)}")
    return None


def _merge_added_scores(ctx: Context, scores: dict, heads: np.ndarray, qa: np.ndarray, ka: np.ndarray) -> None:
    """Other pending scores added to these before the softmax (DeBERTa's content-to-position and
    position-to-content terms, ``q @ pk^T`` and ``k @ pq^T``): when their head atoms were tied to ``heads`` by
    the addition and their queries/keys, head by head, hold only channels tied to this block's queries/keys
    ``qa``/``ka`` (H, d), the block's head permutation and per-head maps move them too: they are read here and
    are no longer pending. Scores of other queries/keys stay pending (their heads are then kept in place)."""
    def roots(table):
        return [{ctx.atoms.find(int(t))[0] for t in row if t >= 0} for row in table]

    block = [a | b for a, b in zip(roots(qa), roots(ka))]
    head_roots = [ctx.atoms.find(int(h))[0] for h in heads]
    for first, (oq, ok, other, _) in list(scores.items()):
        if len(other) != len(heads) or [ctx.atoms.find(int(h))[0] for h in other] != head_roots \
                or oq.shape[0] != len(block) or ok.shape[0] != len(block):
            continue
        if all(q | k <= mine for q, k, mine in zip(roots(oq), roots(ok), block)):
            del scores[first]


def _pending(ctx: Context) -> dict:
    """Scores ``q @ k^T`` not yet read by ``p @ v``: first head atom -> (q table, k table, head atoms, node)."""
    return ctx.scratch.setdefault("attention.scores", {})


def _mixed_weights_times_values(ctx: Context, node: fx.Node, p: Layout, v: Layout, shape: tuple):
    """``p @ v`` where p's head axis holds channels that are not the scores' heads (talking heads: p was mixed
    across heads by a linear map). Head h of the output is p[h] @ v[h]: the values keep their per-head maps
    B_g (undone by the output projection), but p's heads stay in place, so no head permutation."""
    nd = p.ndim
    got = _heads_table(v)
    if got is None or len(p.atoms) != got[0].shape[0]:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a product of hidden values that is not attention")
    ctx.pin(p, f"{ctx.describe(node)}: attention weights mixed across heads (talking heads) keep their heads in "
               "place")
    _record(ctx, node, None, None, got[0])
    return L.with_non_feature_size(v, nd - 2, shape[nd - 2])


@finisher
def scores_not_read_by_heads(ctx: Context) -> None:
    """Scores that never reached ``p @ v`` with their head atoms (read across heads, e.g. talking heads' linear
    map over the head axis, by an operation without a rule, or by a ``p @ v`` whose values could not be
    followed): their heads stay in place (the head atoms are
    pinned, so the map across heads keeps its columns), and their queries and keys keep the per-head maps
    A_g, A_g^-T, which leave every head's scores unchanged."""
    pending = _pending(ctx)
    for qa, ka, heads, node in pending.values():
        ctx.atoms.pin(heads, f"{ctx.describe(node)}: attention scores not read head by head by p @ v (talking "
                             "heads, or values that could not be followed) keep their heads in place")
        _record(ctx, node, qa, ka, None)
    pending.clear()

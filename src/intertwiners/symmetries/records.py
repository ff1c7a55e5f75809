"""What the analysis of a captured graph records: frozen, typed values.

The rules (:mod:`~intertwiners.symmetries.ops`) see graph values as one of

* a :class:`~intertwiners.symmetries.layout.Layout` — a *hidden* value (a tensor a symmetry acts on);
* a :class:`ParamRef` — a parameter or buffer of the model (possibly viewed/unsqueezed);
* a :class:`DerivedParam` — an elementwise function of one parameter (Gemma's ``1 + w``);
* a :class:`ConcatParam` — 1-D parameters concatenated (BEiT's q bias, zero k bias, v bias);
* a :class:`GatheredParam` — a parameter's slices picked by indices (the experts a token is routed to);
* a :class:`SlicedParam` — a contiguous part of a parameter along one axis (``in_proj_weight.split(...)``);
* a :class:`NormedWeight` — a weight-norm parametrised weight ``g · v / ||v||`` (``torch._weight_norm``);
* a :class:`StandardizedWeight` — a weight standardised row by row (``F.batch_norm`` of a reshaped weight,
  timm's ``StdConv2d`` / ``ScaledStdConv2d``);
* a :class:`ResampledParam` — a parameter through a map that is linear and the same at every index of the axes
  it keeps (a position table interpolated to another grid);
* ``None`` — an untransformed tensor, or anything else (sizes, constants);

and record, through :class:`~intertwiners.symmetries.context.Context`, the facts below. After the pass
they are gathered in one frozen :class:`Analysis` that the resolver reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import Channels, Layout


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer (qualified ``name``), possibly viewed/unsqueezed to ``shape`` (element order
    unchanged)."""
    name: str
    shape: tuple


@dataclass(frozen=True)
class DerivedParam:
    """An elementwise function of one parameter with constants (Gemma's RMSNorm gain ``1 + w``), possibly viewed
    to ``shape`` (element order unchanged). Only a per-channel product or a standardised weight's gain may use
    it (it permutes ``name``, and permuting w permutes f(w)); every other rule sees an untransformed tensor.
    ``scales``: f(d·w) = d·f(w) (products and quotients by constants, timm's ``gain * scale``), so a scaling of
    f(w) is a scaling of w."""
    name: str
    shape: tuple
    scales: bool = False


@dataclass(frozen=True)
class ConcatParam:
    """1-D parameters/buffers and zeros concatenated (``torch.cat((q_bias, k_bias, v_bias))``, BEiT's qkv bias):
    ``parts`` is ((ParamRef or None for zeros, start, length), ...) along the result's length ``shape[0]``.
    Only a layer's bias may use it (each part moves with its slice of the new channels, which it keeps apart
    from the other slices); every other rule sees an untransformed tensor."""
    parts: tuple
    shape: tuple


@dataclass(frozen=True)
class GatheredParam:
    """Slices of a parameter (``name``, of shape ``shape``) along its first axis picked by untransformed indices:
    ``gate_up_proj[expert_ids]``, the weights of the experts each token is routed to (transformers' batched
    mixture-of-experts). A batched product with a hidden value uses it as one linear layer per picked slice,
    all moved alike (the same transform for every expert); every other rule sees an untransformed tensor."""
    name: str
    shape: tuple


@dataclass(frozen=True)
class Span:
    """The part of a parameter of shape ``full`` that a use reads: ``start:stop`` along ``axis``."""
    axis: int
    start: int
    stop: int
    full: tuple

    def overlaps(self, other: Span) -> bool:
        """Do the two parts share an element?"""
        return other.axis != self.axis or (self.start < other.stop and other.start < self.stop)


@dataclass(frozen=True)
class SlicedParam:
    """A contiguous part of a parameter (``name``) along one axis, ``span``, of shape ``shape`` (the parameter's
    shape but along ``span.axis``): ``w_q, w_kv = in_proj_weight.split([E, 2 * E])``, the packed projection of
    ``nn.MultiheadAttention`` when queries and keys are different tensors. A linear layer's weight or bias may
    use it (the use moves only that part of the parameter, see :class:`ParamUse`); every other rule sees an
    untransformed tensor."""
    name: str
    shape: tuple
    span: Span


@dataclass(frozen=True)
class NormedWeight:
    """A weight written as ``g · v / ||v||`` (``torch._weight_norm(v, g, dim)``, what
    ``torch.nn.utils.parametrizations.weight_norm`` and ``torch.nn.utils.weight_norm`` compute): the norm is
    taken over every axis but ``dim`` (all axes when ``dim`` is -1), ``g`` holds one magnitude per index along
    ``dim``. Only a linear layer or convolution may use it (the direction ``v`` and the magnitude ``g`` then
    move so that the weight moves as a parameter would, see :func:`~.ops.norm.normed_weight`); every other
    rule sees an untransformed tensor."""
    v: ParamRef
    g: ParamRef
    dim: int
    shape: tuple


@dataclass(frozen=True)
class StandardizedWeight:
    """A weight standardised row by row, ``gain · (w - mean) / sqrt(var + eps) + bias``, the mean and variance of
    each output row of ``w`` taken over all its other elements: ``F.batch_norm(w.reshape(1, out, -1), None,
    None, gain, bias, training=True)`` (timm's ``StdConv2d``, and ``ScaledStdConv2d`` with ``gain = g * scale``).
    ``w`` is the raw parameter with its own shape (out, ...); ``gain``/``bias`` (out elements each) are a
    parameter, a derived parameter or None; ``shape`` is the shape of the value now (the layer reads it
    reshaped back to ``w``'s). Only a linear layer or convolution may use it (w, gain and bias then move so that
    the standardised weight moves as a parameter would, see :func:`~.ops.norm.standardized_weight`); every
    other rule sees an untransformed tensor."""
    w: ParamRef
    gain: ParamRef | DerivedParam | None
    bias: ParamRef | DerivedParam | None
    shape: tuple


@dataclass(frozen=True)
class ResampledParam:
    """Parameters (``names``) through a map that is linear and the same at every index of the axes it keeps:
    reshaped, transposed, sliced, interpolated, concatenated. A position table resized to the input's grid is
    one (``interpolate(pos.reshape(1, h, w, C).permute(0, 3, 1, 2), size)``, DINOv2 or a ViT at another
    resolution, concatenated with the class token's position). ``shape``: the value's shape; ``kept``: for each
    of its axes, None where the map mixes, else the axis of each parameter of ``names`` that it is, index for
    index. An addition to a hidden value reads it along a kept axis holding the channels (the map commutes with
    any transform of that axis, so each parameter moves there as a bias would, see
    :func:`~.ops.arithmetic.add`); rules read it with ``ctx.value(arg, resampled=True)``, every other rule sees
    an untransformed tensor."""
    names: tuple
    shape: tuple
    kept: tuple


PARAMETER_VALUES = (ParamRef, DerivedParam, ConcatParam, GatheredParam, SlicedParam, NormedWeight, StandardizedWeight,
                    ResampledParam)
"""The values that stand for (functions of) parameters: a node returning one reads no parameter itself."""

ROLES = ("rows", "columns", "gain", "permuted")


@dataclass(frozen=True, eq=False)
class ParamUse:
    """How one use of a parameter/buffer moves it, along ``dim`` (None: the flattened tensor):

    * ``rows``: t -> T t, T the transform of ``channels`` (a producer's weight rows, a bias, an embedding);
    * ``columns``: w -> w T^-1 (a consumer's weight columns);
    * ``gain``: a per-channel factor w -> P diag(t/s) w with t from ``channels`` and s from ``inner`` (norm
      gains, depthwise filters, layer scale);
    * ``permuted``: permuted only (running variances).

    ``channels`` (and ``inner``) list the channel at every position along ``dim`` of the part the use reads:
    the whole parameter when ``span`` is None, else only ``span`` (a :class:`SlicedParam`; each block of output
    rows of a grouped convolution, which reads its own block of input channels). A span along ``dim`` covers
    positions ``span.start:span.stop``; a span along another axis leaves every position along ``dim`` but moves
    them inside that block only."""
    param: str
    dim: int | None
    role: str
    channels: Channels
    inner: Channels | None = None
    span: Span | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.span is not None and self.dim is None:
            raise ValueError(f"a part of parameter {self.param!r} read as a flattened tensor")


@dataclass(frozen=True, eq=False)
class Requirement:
    """Constraint ``kind`` (a class of :mod:`~intertwiners.symmetries.constraints`) on the transform of
    ``channels``; ``key`` names the activation group for ``Activation``."""
    kind: type
    channels: Channels
    key: str | None = None


@dataclass(frozen=True, eq=False)
class Tie:
    """Two values added together (a residual connection) or two uses of one parameter: position by position,
    the channels of ``a`` and ``b`` carry the same transform."""
    a: Channels
    b: Channels


@dataclass(frozen=True, eq=False)
class SiteRecord:
    """An activation site (``name``, as :func:`~intertwiners.activation_sites` lists it), its input and the
    key of its activation's group (None when the activation is pinned)."""
    name: str
    value: Layout
    key: str | None = None


@dataclass(frozen=True, eq=False)
class AttentionRecord:
    """One attention call: atoms per head of the queries ``q`` (H, dk), the keys ``k`` (H, dk; a key/value
    head repeated for grouped-query attention), the values ``v`` (H, dv); ``q``/``k`` None when they are
    untransformed, ``v`` None when the scores never reach the values head by head (talking heads mix them
    across heads: queries/keys only, heads in place). ``heads`` (H,): the head atoms of written-out scores
    (softmax(q k^T) v). ``owner``: the module that computes it (the attention space is named after it)."""
    owner: str
    q: np.ndarray | None
    k: np.ndarray | None
    v: np.ndarray | None
    kv_heads: int
    heads: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class Pins:
    """Atoms that must stay fixed, with the reasons, in the order the pass found them: pin event ``k`` fixed
    the atoms ``atoms[events == k]`` (each once) because of ``reasons[k]``. ``atoms``/``events``: (m,)."""
    atoms: np.ndarray
    events: np.ndarray
    reasons: tuple


@dataclass(frozen=True, eq=False)
class Analysis:
    """Everything the pass over a captured graph found (input of :mod:`~intertwiners.symmetries.resolve`).

    ``values``: every hidden value (and side axis), in graph order. ``roots``/``parity`` (atoms,): each
    atom's class after the ties and its dual parity (1: it carries A^-T of its class). ``pins``: which
    atoms must stay fixed and why (:class:`Pins`). ``outputs`` (k,): the atoms that reach the model's output,
    sorted. ``chains``: chain id -> chain. ``groups``: activation key -> group."""
    values: tuple
    roots: np.ndarray
    parity: np.ndarray
    pins: Pins
    outputs: np.ndarray
    chains: tuple
    groups: dict
    requirements: tuple
    ties: tuple
    uses: tuple
    sites: tuple
    attention: tuple
    lowest_cast: object = None   # torch.dtype or None: see Captured.lowest_cast

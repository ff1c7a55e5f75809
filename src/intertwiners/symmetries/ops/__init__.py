"""The built-in rules, one module per family of operations; importing this package registers them all.

========================  ==================================================================================
:mod:`.linear`            linear, addmm, matmul/mm/bmm by a parameter, baddbmm, einsum, convolutions
                          (depthwise, grouped), embedding and table lookups (index, index_select), gather,
                          gathered experts
:mod:`.norm`              batch norm, layer norm, group norm, weight normalisation (instance norm pinned)
:mod:`.shape`             copies, views, transposes, broadcasts, select/slice/split, cat, padding;
                          parameters resampled through them (position tables resized to the input's grid)
:mod:`.reduce`            pooling, upsampling (every interpolation mode), mean/sum/max/var, vector norms,
                          softmax
:mod:`.arithmetic`        add/sub (residuals, biases, resampled position tables), mul/div (gains, gates,
                          rotary factors), where, neg, max/min with a bound
:mod:`.attention`         scaled_dot_product_attention, attention written out with matmul/bmm, talking heads,
                          similarities of two towers' embeddings (a bilinear form)
:mod:`.activation`        chains of elementwise operations (activations), functions of parameters
:mod:`.recurrent`         LSTM, GRU and RNN layers (one operation over a sequence)
========================  ==================================================================================

Adding an operation is adding one rule to one of these modules (or, from a user's code,
:func:`~intertwiners.symmetries.register_rule`).
"""

from . import activation, arithmetic, attention, linear, norm, recurrent, reduce, shape

__all__ = ["activation", "arithmetic", "attention", "linear", "norm", "recurrent", "reduce", "shape"]

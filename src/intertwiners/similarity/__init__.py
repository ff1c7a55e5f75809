"""Similarity of hidden representations (paper section 5): G_ReLU-Procrustes, G_ReLU-CKA and their
classical (orthogonal) counterparts, exact and fast.

>>> from intertwiners import similarity as sim
>>> sim.cka(X, Y, kernel="linear", estimator="unbiased")   # kernel: linear | rbf | max
>>> sim.grelu_cka(X, Y)                                    # Definition 5.3
>>> sim.procrustes(X, Y, group="grelu", center=False)      # orthogonal | permutation | grelu
>>> sim.max_kernel(X, Y=None)                              # K[i, j] = max_k X[i, k] * Y[j, k]
>>> m = sim.MinibatchCKA(kernel="linear"); m.update(Xb, Yb); m.compute()
>>> sim.layer_similarity_matrix(model_a, model_b, data, measure="grelu_cka")   # Figs. 2 and 5
>>> sim.procrustes_per_layer(model_a, model_b, data)                           # Table 2
>>> r = sim.permutation_test(X, Y, measure="grelu_cka", n_permutations=1000)  # r.statistic, r.pvalue

See docs/similarity.md.
"""

from .cka import cka, cka_from_grams, grelu_cka
from .hsic import hsic, hsic_biased, hsic_unbiased
from .kernels import grelu_normalise, linear_gram, rbf_gram
from .max_kernel import max_kernel
from .permutation import MEASURES as PERMUTATION_MEASURES
from .permutation import PermutationTestResult, permutation_test
from .procrustes import ProcrustesStats, procrustes
from .streaming import MEASURES, MinibatchCKA, layer_similarity_matrix, procrustes_per_layer

__all__ = ["MEASURES", "PERMUTATION_MEASURES", "MinibatchCKA", "PermutationTestResult", "ProcrustesStats", "cka",
           "cka_from_grams", "grelu_cka", "grelu_normalise", "hsic", "hsic_biased", "hsic_unbiased",
           "layer_similarity_matrix", "linear_gram", "max_kernel", "permutation_test", "procrustes",
           "procrustes_per_layer", "rbf_gram"]

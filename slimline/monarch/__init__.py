"""Monarch matrices (Dao et al. 2022): projection of dense weights and the plain-torch form.

``monarch_shape`` cuts a layer into blocks, ``project`` finds the nearest Monarch matrix (a rank-T
SVD per slab), ``monarch_forward`` runs the factors with reshapes and two ``bmm``. The pass that
uses them is :mod:`slimline.passes.monarch`; the fused CUDA kernel is
:mod:`slimline.backends.cuda.monarch_kernel`.
"""

from slimline.monarch.form import monarch_forward
from slimline.monarch.projection import (
    UNEVEN_POLICIES,
    MonarchFactors,
    MonarchShape,
    dense_from_factors,
    lowrank_equal_params_rank,
    monarch_shape,
    project,
    random_factors,
    relative_errors,
    slab_singular_values,
)

__all__ = ["MonarchShape", "MonarchFactors", "monarch_shape", "project", "dense_from_factors",
           "random_factors", "slab_singular_values", "lowrank_equal_params_rank", "relative_errors",
           "monarch_forward", "UNEVEN_POLICIES"]

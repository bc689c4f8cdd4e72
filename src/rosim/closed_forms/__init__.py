"""Closed forms that work on sentence vectors without a training loop.

* `GaussianLogisticRegression`: logistic / softmax regression solved analytically under
  shared-covariance Gaussian classes (kexue.fm/archives/8578); scikit-learn compatible.
* `kl`, `bhattacharyya`, `hellinger`, `w2`, `fit_gaussian`: distances between multivariate normals
  (kexue.fm/archives/8512), NumPy or differentiable torch, batched and pairwise.
* `rotation_between`, `reflection_between`, `involution_between`, `orthogonal_map`: orthogonal maps
  taking one unit vector to another (kexue.fm/archives/8453), batched, applied in O(d).
"""

from rosim.closed_forms.gaussian_distances import Gaussian, bhattacharyya, fit_gaussian, hellinger, kl, w2
from rosim.closed_forms.gaussian_lr import GaussianLogisticRegression
from rosim.closed_forms.orthogonal import (
    OrthogonalMap,
    involution_between,
    orthogonal_map,
    reflection_between,
    rotation_between,
)

__all__ = [
    "Gaussian",
    "GaussianLogisticRegression",
    "OrthogonalMap",
    "bhattacharyya",
    "fit_gaussian",
    "hellinger",
    "involution_between",
    "kl",
    "orthogonal_map",
    "reflection_between",
    "rotation_between",
    "w2",
]

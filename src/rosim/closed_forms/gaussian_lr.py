"""Logistic / softmax regression in closed form (kexue.fm/archives/8578).

Assume each class is Gaussian with a shared covariance, p(x|k) = N(μ_k, Σ), and prior p_k. Bayes'
rule then gives exactly a linear softmax model (the quadratic terms cancel):

    logit_k(x) = x Σ⁻¹ μ_kᵀ − ½ μ_k Σ⁻¹ μ_kᵀ + ln p_k

and for two classes σ(x w + b) with w = (μ₁ − μ₀)Σ⁻¹, b = −½(μ₁ − μ₀)Σ⁻¹(μ₁ + μ₀)ᵀ + ln(p₁/p₀).
Σ is the pooled within-class covariance Σ_k p_k C_k (C_k the biased covariance of class k), which is
Su's Σ = I − Σ_k p_k μ_kᵀμ_k after whitening. This is scikit-learn's
``LinearDiscriminantAnalysis(solver="lsqr")``, same numbers, fitted with one pass over the data,
a Cholesky factorisation and a triangular solve (least squares if Σ is singular) — no iterations,
no explicit inverse.
"""

from __future__ import annotations

import json
import os
import warnings
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.sparse
from scipy.special import expit, log_expit, log_softmax, softmax
from sklearn.base import BaseEstimator, _fit_context
from sklearn.linear_model._base import LinearClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from rosim.errors import CheckpointError, InputError

__all__ = ["GaussianLogisticRegression"]

_FORMAT = "rosim.closed_forms.GaussianLogisticRegression"
_VERSION = 1
_EPS = float(np.finfo(np.float64).eps)


def _host(a: Any) -> Any:
    """A torch tensor (any device, with or without grad) as a NumPy array; anything else unchanged."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        return a.detach().cpu().numpy()
    return a


class GaussianLogisticRegression(LinearClassifierMixin, BaseEstimator):
    """Closed-form logistic (2 classes) / softmax (K classes) regression under shared-covariance Gaussians.

    Parameters
    ----------
    priors : array-like of shape (n_classes,), optional
        Class priors p_k; by default the class frequencies.
    shrinkage : None, float in [0, 1] or "auto"
        Shrink each class covariance to (1 − α)C_k + α·(Tr C_k / d)·I, or pick α by Ledoit–Wolf
        ("auto"), as scikit-learn's LDA does. Su's recipe has none.
    whiten : bool
        Estimate in whitened coordinates (overall mean 0, covariance I; directions of zero total
        variance dropped), as the post recommends. Without shrinkage it changes only rounding;
        with shrinkage the shrinkage target becomes the total covariance.

    Attributes
    ----------
    classes_ : ndarray (n_classes,)
    coef_ : ndarray (1, d) for two classes, else (n_classes, d)
    intercept_ : ndarray (1,) or (n_classes,)
    means_ : ndarray (n_classes, d)
    priors_ : ndarray (n_classes,)
    covariance_ : ndarray (d, d)
        The pooled within-class covariance Σ the model used (in input coordinates).
    n_features_in_ : int
    solver_ : str
        "cholesky", or "lstsq" when Σ was singular (minimum-norm solution, as sklearn's lsqr).

    Input checks, parameter validation, `decision_function`, `predict` and `score` are scikit-learn's
    own (``validate_data``, ``_parameter_constraints``, ``LinearClassifierMixin``); torch tensors are
    accepted wherever arrays are.
    """

    _parameter_constraints: dict = {
        "priors": ["array-like", None],
        "shrinkage": [None, StrOptions({"auto"}), Interval(Real, 0, 1, closed="both")],
        "whiten": ["boolean"],
    }

    def __init__(self, priors: Any = None, shrinkage: float | str | None = None, whiten: bool = False):
        self.priors = priors
        self.shrinkage = shrinkage
        self.whiten = whiten

    # ------------------------------------------------------------------ fit

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> GaussianLogisticRegression:
        """Estimate means, priors and the shared covariance, then solve for coef_ and intercept_.

        Parameters
        ----------
        X : array-like or torch.Tensor, shape (n_samples, n_features)
        y : array-like or torch.Tensor, shape (n_samples,); any hashable, sortable labels

        Returns
        -------
        self
        """
        X, y = validate_data(self, _host(X), _host(y), dtype=np.float64)
        with warnings.catch_warnings():
            # "more unique classes than 50% of the samples: could be a regression problem": for labels given
            # to a classifier on purpose (e.g. many small intent classes) that is noise; the one-sample case
            # that matters gets its own warning where it bites (the Ledoit-Wolf path)
            warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
            check_classification_targets(y)
        n, d = X.shape
        classes, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
        k = len(classes)
        if k < 2:
            label = f" ({classes[0]!r})" if k else ""
            raise InputError(f"y has only one class{label}; a classifier needs at least 2 classes")
        priors = self._priors(counts, n)

        onehot = scipy.sparse.csr_matrix((np.ones(n), (y_idx, np.arange(n))), shape=(k, n))
        means = np.asarray(onehot @ X) / counts[:, None]

        if self.whiten:
            # Whitening kernel K (d × r) of the (prior-weighted) total covariance Σ_W + Σ_k p_k δ_kδ_kᵀ,
            # δ_k = μ_k − Σ_j p_j μ_j, BERT-whitening style (eigh; directions of no variance dropped).
            # In z = (x − c)K coordinates Σ_z = I − Σ_k p_k (δ_kK)ᵀ(δ_kK), Su's form; rounding is all
            # that changes unless shrinkage (then applied in z coordinates).
            within = _pooled_scatter(X, y_idx, means, counts, priors)
            delta = means - priors @ means
            total = within + (delta * priors[:, None]).T @ delta
            s, U = np.linalg.eigh((total + total.T) / 2)
            keep = s > d * _EPS * max(s.max(), 0.0)
            if not keep.any():
                raise InputError("X has no variance in any direction")
            kernel = U[:, keep] / np.sqrt(s[keep])  # z = (x − c) kernel
            if self.shrinkage == "auto":  # Ledoit–Wolf needs the samples themselves, in z coordinates
                Z = X @ kernel
                cov_z = _ledoit_wolf_pooled(Z, y_idx, priors)
            else:
                cov_z = self._shrink(kernel.T @ within @ kernel)
            # rows μ_k K Σ_z⁻¹ Kᵀ = μ_k Σ⁻¹: the same coef_ as without whitening, not a shifted one
            coef_z, solver = _solve_coef(cov_z, means @ kernel)
            coef = coef_z @ kernel.T
            back = U[:, keep] * np.sqrt(s[keep])  # x − c = z backᵀ
            covariance = back @ cov_z @ back.T
        else:
            if self.shrinkage == "auto":
                covariance = _ledoit_wolf_pooled(X, y_idx, priors)
            else:
                covariance = self._shrink(_pooled_scatter(X, y_idx, means, counts, priors))
            coef, solver = _solve_coef(covariance, means)
        intercept = _intercepts(coef, means, priors)
        rank = int(keep.sum()) if self.whiten else d
        if not self.shrinkage and n - k < rank:  # Σ singular whatever the rounding
            warnings.warn(f"the pooled within-class covariance is singular ({n} samples − {k} classes < {rank} "
                          "dimensions), so the closed form is not unique and the least-squares choice may "
                          "ignore a separating direction; use shrinkage='auto' or a float",
                          UserWarning, stacklevel=2)

        self.classes_ = classes
        self.means_ = means
        self.priors_ = priors
        self.covariance_ = (covariance + covariance.T) / 2
        self.coef_ = coef
        self.intercept_ = intercept
        self.solver_ = solver
        return self

    def _priors(self, counts: np.ndarray, n: int) -> np.ndarray:
        if self.priors is None:
            return counts / n
        p = np.asarray(self.priors, dtype=np.float64).reshape(-1)
        if p.shape[0] != counts.shape[0]:
            raise InputError(f"priors has {p.shape[0]} entries but y has {counts.shape[0]} classes")
        if not np.isfinite(p).all() or (p <= 0).any():
            raise InputError("priors must be finite and > 0 (a class with prior 0 is never predicted)")
        if abs(p.sum() - 1.0) > 1e-5:
            warnings.warn("the priors do not sum to 1; renormalising", UserWarning, stacklevel=3)
        return p / p.sum()

    def _shrink(self, cov: np.ndarray) -> np.ndarray:
        """(1 − α)Σ + α·(Tr Σ / d)·I: the same as shrinking every C_k, since it is linear in C_k."""
        if not self.shrinkage:
            return cov
        a, d = float(self.shrinkage), cov.shape[0]
        return (1 - a) * cov + a * (np.trace(cov) / d) * np.eye(d)

    # ------------------------------------------------------------------ predict

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits: shape (n,) for two classes (the log-odds of classes_[1]), else (n, n_classes)."""
        return super().decision_function(_host(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in the order of classes_."""
        s = self.decision_function(X)
        if s.ndim == 1:
            p1 = expit(s)
            return np.stack([expit(-s), p1], axis=1)
        return softmax(s, axis=1)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """log predict_proba, computed without under/overflow."""
        s = self.decision_function(X)
        if s.ndim == 1:
            return np.stack([log_expit(-s), log_expit(s)], axis=1)
        return log_softmax(s, axis=1)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        return super().predict(_host(X))

    # ------------------------------------------------------------------ torch and files

    def to_linear(self, dtype: Any = None, device: Any = None):
        """An equivalent ``torch.nn.Linear(d, 1 or n_classes)``: weight = coef_, bias = intercept_.

        Apply a sigmoid to its output for two classes, a softmax otherwise.
        """
        import torch

        check_is_fitted(self)
        dtype = dtype or torch.get_default_dtype()
        layer = torch.nn.Linear(self.coef_.shape[1], self.coef_.shape[0], dtype=dtype, device=device)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.coef_))
            layer.bias.copy_(torch.from_numpy(np.asarray(self.intercept_)))
        return layer

    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """Write the fitted model to directory ``path`` (config.json + arrays.safetensors), atomically.

        ``metadata`` (JSON-serialisable) is stored alongside and comes back as ``metadata_``.
        An existing ``path`` is replaced only if it holds a model saved by this method.
        """
        from safetensors.numpy import save_file

        check_is_fitted(self)
        path = Path(path)
        kind = self.classes_.dtype.kind
        if kind not in "iubfU" and not (kind == "O" and all(isinstance(c, str) for c in self.classes_)):
            raise InputError(f"cannot save class labels of dtype {self.classes_.dtype}; use str or int labels")
        shrink = self.shrinkage
        config = {
            "format": _FORMAT,
            "version": _VERSION,
            "params": {
                "priors": None if self.priors is None else np.asarray(self.priors, dtype=float).tolist(),
                "shrinkage": shrink if shrink in (None, "auto") else float(shrink),
                "whiten": bool(self.whiten),
            },
            "classes": self.classes_.tolist(),
            "classes_kind": "str" if kind in "OU" else {"b": "bool", "f": "float"}.get(kind, "int"),
            "n_features_in": int(self.n_features_in_),
            "solver": self.solver_,
            "metadata": metadata or {},
        }
        try:
            text = json.dumps(config, ensure_ascii=False, indent=2)
        except TypeError as exc:
            raise InputError(f"metadata must be JSON-serialisable: {exc}") from None
        if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or _is_ours(path))):
            raise InputError(f"{path} exists and is not a saved classifier; choose another path")
        from rosim.textio import atomic_directory

        with atomic_directory(path) as tmp:
            arrays = {"coef": self.coef_, "intercept": np.asarray(self.intercept_), "means": self.means_,
                      "priors": self.priors_, "covariance": self.covariance_}
            save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()},
                      str(tmp / "arrays.safetensors"))
            (tmp / "config.json").write_text(text + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianLogisticRegression:
        """Read a model written by `save` (no pickle involved)."""
        from safetensors.numpy import load_file

        path = Path(path)
        if not (path / "config.json").is_file():
            raise InputError(f"no saved classifier at {path} (config.json missing)")
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            if config.get("format") != _FORMAT:
                raise CheckpointError(f"{path}/config.json is not a {_FORMAT} file")
            if config.get("version") != _VERSION:
                raise CheckpointError(f"{path}: unsupported version {config.get('version')!r}")
            arrays = load_file(str(path / "arrays.safetensors"))
        except CheckpointError:
            raise
        except Exception as exc:  # OSError, bad JSON, or safetensors' own error for a truncated file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"cannot read the classifier in {path}: {first}; refit it with "
                                  "`rosim classify fit`") from None
        try:
            return cls._from_parts(config, arrays)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path} is not a valid saved classifier ({type(exc).__name__}: {exc}); "
                                  "refit it with `rosim classify fit`") from None

    @classmethod
    def _from_parts(cls, config: dict, arrays: dict) -> GaussianLogisticRegression:
        if not isinstance(config, dict):
            raise TypeError("config.json is not an object")
        params = config["params"]
        model = cls(priors=params["priors"], shrinkage=params["shrinkage"], whiten=params["whiten"])
        dtype = {"str": str, "bool": bool, "float": np.float64, "int": np.int64}[config["classes_kind"]]
        classes = config["classes"]
        if not isinstance(classes, list) or len(classes) < 2:
            raise ValueError(f"'classes' must be a list of at least 2 labels, got {classes!r:.60}")
        model.classes_ = np.asarray(classes, dtype=dtype)
        for name in ("coef", "intercept", "means", "priors", "covariance"):
            if name not in arrays or arrays[name].dtype.kind != "f" or not np.isfinite(arrays[name]).all():
                raise ValueError(f"array {name!r} is missing, not floating point or not finite")
        model.coef_ = arrays["coef"]
        model.intercept_ = arrays["intercept"]
        model.means_ = arrays["means"]
        model.priors_ = arrays["priors"]
        model.covariance_ = arrays["covariance"]
        model.n_features_in_ = int(config["n_features_in"])
        model.solver_ = config.get("solver", "cholesky")
        model.metadata_ = config.get("metadata", {})
        if not isinstance(model.metadata_, dict):
            raise TypeError("'metadata' must be an object")
        k, d = len(model.classes_), model.n_features_in_
        if model.coef_.shape != ((1, d) if k == 2 else (k, d)) or model.means_.shape != (k, d) \
                or model.intercept_.shape != ((1,) if k == 2 else (k,)) or model.priors_.shape != (k,):
            raise ValueError(f"array shapes do not match {k} classes and {d} features")
        return model


def _is_ours(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("format") == _FORMAT
    except (OSError, ValueError):
        return False


def _pooled_scatter(X: np.ndarray, y_idx: np.ndarray, means: np.ndarray, counts: np.ndarray,
                    priors: np.ndarray) -> np.ndarray:
    """Σ_k p_k C_k with C_k the biased covariance of class k: one symmetric rank-n update (syrk)."""
    Xc = (X - means[y_idx]) * np.sqrt(priors / counts)[y_idx, None]
    upper = scipy.linalg.blas.dsyrk(1.0, np.asfortranarray(Xc.T) if not Xc.T.flags.f_contiguous else Xc.T)
    return np.triu(upper) + np.triu(upper, 1).T


def _ledoit_wolf_pooled(X: np.ndarray, y_idx: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Σ_k p_k LW(C_k), Ledoit–Wolf on standardised features per class, as scikit-learn's LDA."""
    from sklearn.covariance import ledoit_wolf

    d = X.shape[1]
    cov = np.zeros((d, d))
    single = 0
    for j in range(len(priors)):
        Xj = X[y_idx == j]
        single += len(Xj) == 1
        scale = Xj.std(axis=0)
        scale[scale == 0] = 1.0  # as StandardScaler does
        with warnings.catch_warnings():  # scikit-learn warns once per one-sample class: said once below
            warnings.filterwarnings("ignore", message="Only one sample available")
            lw = ledoit_wolf((Xj - Xj.mean(axis=0)) / scale, assume_centered=True)[0]
        cov += priors[j] * (scale[:, None] * lw * scale[None, :])
    if single:
        warnings.warn(f"{single} of {len(priors)} classes have a single sample: they add nothing to the shared "
                      "covariance, and their means are single points; give each class several examples",
                      UserWarning, stacklevel=3)
    return cov


def _solve_coef(cov: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, str]:
    """Rows μ_k Σ⁻¹ (K > 2), or the single row (μ₁ − μ₀)Σ⁻¹ (K = 2), by Cholesky or least squares."""
    rhs = (means[1] - means[0])[:, None] if means.shape[0] == 2 else means.T
    d = cov.shape[0]
    try:
        factor = scipy.linalg.cho_factor(cov, lower=True, check_finite=False)
        if (np.diag(factor[0]) ** 2).min() <= d * _EPS * np.diag(cov).max():
            raise np.linalg.LinAlgError("numerically singular")
        return scipy.linalg.cho_solve(factor, rhs, check_finite=False).T, "cholesky"
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return scipy.linalg.lstsq(cov, rhs, check_finite=False)[0].T, "lstsq"


def _intercepts(coef: np.ndarray, means: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """b_k = −½ μ_k·w_k + ln p_k; for two classes b = −½ w·(μ₁ + μ₀) + ln(p₁/p₀)."""
    if means.shape[0] == 2:
        return np.array([-0.5 * coef[0] @ (means[1] + means[0]) + np.log(priors[1] / priors[0])])
    return -0.5 * np.einsum("kd,kd->k", means, coef) + np.log(priors)

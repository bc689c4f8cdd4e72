"""scikit-learn's own estimator checks for GaussianLogisticRegression (the compatibility it claims)."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from rosim.closed_forms import GaussianLogisticRegression


@parametrize_with_checks([GaussianLogisticRegression(), GaussianLogisticRegression(shrinkage="auto", whiten=True)])
def test_sklearn_compatible(estimator, check):
    check(estimator)

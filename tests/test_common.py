"""scikit-learn's estimator checks on every public estimator (and every SAE architecture)."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from sksae import DictionaryLearnerGPU, RefinedAutoencoder, SparseAutoencoder
from sksae.architectures import available

# Small, fast settings: the checks fit dozens of times on tiny arrays.
SAE_INSTANCES = [
    SparseAutoencoder(n_components=8, architecture=name, k=1, max_iter=3, batch_size=16,
                      random_state=0, precision="float32")
    for name in available()
]

ESTIMATORS = SAE_INSTANCES + [
    DictionaryLearnerGPU(n_components=3, alpha=0.1, max_iter=5, batch_size=16, random_state=0),
    RefinedAutoencoder(SparseAutoencoder(n_components=8, k=2, max_iter=3, batch_size=16,
                                         random_state=0, precision="float32"), n_iter=2),
]


def _expected_failed_checks(estimator):
    return {}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)

"""Results of fixed small CPU fits equal those recorded before the redesign (issue 16).

``tests/golden/golden.npz`` was written by ``tests/golden/make_golden.py`` at the
last commit before the redesign; every case must give the same bits (the
coders' compiled CPU tier and the torch step are unchanged), or agree within
1e-6 where a commit message explains a change of float rounding.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import make_golden  # noqa: E402

GOLDEN = np.load(make_golden.PATH)


@pytest.fixture(scope="module")
def X():
    return make_golden.data()


@pytest.mark.parametrize("architecture", make_golden.ARCHITECTURES)
def test_sparse_autoencoder_matches_golden(X, architecture):
    model = make_golden.sae(architecture).fit(X)
    np.testing.assert_array_equal(model.components_, GOLDEN[f"sae/{architecture}/components"])
    np.testing.assert_array_equal(model.transform(X[:100]),
                                  GOLDEN[f"sae/{architecture}/transform"])


@pytest.mark.parametrize("architecture", make_golden.SPARSE_ARCHITECTURES)
def test_sparse_path_matches_golden(X, architecture):
    model = make_golden.sae_sparse(architecture).fit(X)
    key = f"sae_sparse/{architecture}"
    np.testing.assert_array_equal(model.components_, GOLDEN[f"{key}/components"])
    np.testing.assert_array_equal(model.transform(X[:100]), GOLDEN[f"{key}/transform"])


@pytest.mark.parametrize("fit_algorithm", make_golden.FIT_ALGORITHMS)
@pytest.mark.parametrize("transform_algorithm", make_golden.TRANSFORM_ALGORITHMS)
def test_dictionary_learner_matches_golden(X, fit_algorithm, transform_algorithm):
    model = make_golden.dl(fit_algorithm, transform_algorithm).fit(X)
    key = f"dl/{fit_algorithm}/{transform_algorithm}"
    np.testing.assert_allclose(model.components_, GOLDEN[f"{key}/components"],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.transform(X[:100]), GOLDEN[f"{key}/transform"],
                               rtol=0, atol=1e-6)

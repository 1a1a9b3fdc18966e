"""The main job's power estimate: between-seed CV, the ratio a design resolves, the seeds a ratio needs."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from qscope_rl.demo.stats import detectable_ratio, pooled_cv, seeds_needed


def test_pooled_cv_is_the_root_mean_square_of_each_arms_cv():
    arms = [[1.0, 2.0, 3.0], [0.1, 0.1, 0.1], [4.0, 0.0, 2.0]]
    cvs = [np.std(a, ddof=1) / np.mean(a) for a in arms]
    assert pooled_cv(arms) == pytest.approx(math.sqrt(np.mean(np.square(cvs))))
    assert pooled_cv([[0.0, 0.0, 0.0], [1.0, 3.0]]) == pytest.approx(np.std([1, 3], ddof=1) / 2)  # all-zero: no CV
    with pytest.raises(ValueError, match="two seeds"):
        pooled_cv([[1.0]])


def test_seeds_needed_and_detectable_ratio_invert_each_other():
    z = norm.ppf(0.975) + norm.ppf(0.8)
    assert seeds_needed(0.5, 0.5) == math.ceil(2 * 0.25 * z ** 2 / math.log(0.5) ** 2)  # 9 seeds
    for cv in (0.2, 0.7, 1.3):
        for seeds in (3, 10, 40):
            r = detectable_ratio(cv, seeds)
            assert 0 < r < 1 and seeds_needed(cv, r) == seeds  # the ratio that needs exactly these seeds
    assert detectable_ratio(0.5, 3) < detectable_ratio(0.5, 30)  # more seeds resolve ratios nearer 1
    with pytest.raises(ValueError, match="ratio"):
        seeds_needed(0.5, 1.0)

"""The t quantile the A/B intervals use, without scipy: against printed table values."""

import math

import pytest

from schedcp_mcp.validate.tquantile import t_cdf, t_quantile

# two-sided 95 % (p = 0.975) and 99 % (p = 0.995) critical values of Student's t
TABLE = {(1, 0.975): 12.7062047, (2, 0.975): 4.30265273, (3, 0.975): 3.18244631, (4, 0.975): 2.77644511,
         (9, 0.975): 2.26215716, (10, 0.975): 2.22813885, (29, 0.975): 2.04522964, (30, 0.975): 2.04227246,
         (120, 0.975): 1.97993040, (1, 0.995): 63.6567412, (5, 0.995): 4.03214298, (20, 0.95): 1.72471824}


@pytest.mark.parametrize("df,p", sorted(TABLE))
def test_t_quantile_matches_the_table(df, p):
    assert t_quantile(p, df) == pytest.approx(TABLE[df, p], rel=1e-7)


def test_t_quantile_is_symmetric_and_inverts_the_cdf():
    assert t_quantile(0.5, 7) == 0.0
    assert t_quantile(0.025, 4) == pytest.approx(-TABLE[4, 0.975], rel=1e-7)
    for df in (1, 3, 12, 60):
        assert t_cdf(t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-10)
    assert math.isclose(t_quantile(0.975, 10_000), 1.9602, rel_tol=1e-4)

"""The sweeps' shared parts: the objective, the search space and its keys."""

import pytest

from jobs.tune.search import ObjectiveConfig, lookup, objective_of, search_space, space_keys


def test_objective_and_space():
    s = {"world/overall": 0.5, "artifact_ratio": 1.5, "fid": 10.0}
    assert objective_of(s, ObjectiveConfig()) == (0.5, True)
    assert objective_of(s, ObjectiveConfig(metric="fid", mode="min")) == (-10.0, True)
    assert objective_of(s, ObjectiveConfig(artifact_max=1.2, artifact_weight=2.0)) == (pytest.approx(0.5 - 0.6), False)
    assert objective_of(s, ObjectiveConfig(artifact_max=1.2, artifact_mode="infeasible"))[0] < -1e5
    with pytest.raises(ValueError, match="is not computed"):
        objective_of(s, ObjectiveConfig(metric="clip_score"))
    with pytest.raises(ValueError, match="search space steps"):
        search_space({"steps": {"between": [1, 2]}})


def test_nested_spaces_follow_the_config():
    from ray import tune

    space = {"denoiser": {"t_mu": {"uniform": [-1.6, 0.4]}, "noise_scale": {"choice": [1.0, 2.0]}},
             "optim": {"lr": {"grid": [1e-3, 2e-3]}}, "steps": 10}
    out = search_space(space, nested=True)
    assert isinstance(out["denoiser"]["t_mu"], tune.search.sample.Float) and out["steps"] == 10
    assert out["optim"]["lr"] == {"grid_search": [1e-3, 2e-3]}
    assert space_keys(space) == ["denoiser.t_mu", "denoiser.noise_scale", "optim.lr", "steps"]
    assert lookup({"denoiser": {"t_mu": -0.5}}, "denoiser.t_mu") == -0.5 and lookup({}, "denoiser.t_mu") is None
    with pytest.raises(ValueError, match="search space denoiser.t_sigma: use one of"):
        search_space({"denoiser": {"t_sigma": {"uniform": [0.4, 1.6], "choice": [1]}}}, nested=True)
    with pytest.raises(ValueError, match="search space t_mu: uniform takes a list"):
        search_space({"t_mu": {"uniform": 0.4}})

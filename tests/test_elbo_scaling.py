"""examples/elbo_scaling.py end to end at its --tiny size: the cache, the figures, finite
numbers, and the identity the study rests on (mean over pixels = the beta = D ELBO / D)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "elbo_scaling.py"
FIGURES = ("rate_distortion.png", "active_units.png", "bound_vs_beta.png", "reconstructions.png")


def _load_study(monkeypatch):
    # examples/ is not a package: load the script by path. The module goes into sys.modules
    # first, where its dataclass looks itself up.
    spec = importlib.util.spec_from_file_location("elbo_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_tiny_study_caches_plots_and_checks_the_gradient(tmp_path, monkeypatch):
    study = _load_study(monkeypatch)
    cache = study.main(["--tiny", "--out", str(tmp_path), "--workers", "1"])

    assert json.loads((tmp_path / "results.json").read_text()) == cache
    runs = cache["runs"]
    assert {(r["dataset"], r["config"], r["seed"]) for r in runs} == {
        (ds, c, s) for ds in study.TINY["datasets"] for c in study.TINY["configs"] for s in study.TINY["seeds"]
    }
    for r in runs:
        assert all(math.isfinite(v) for v in r["metrics"].values()), r
        assert 0 <= r["metrics"]["active_units"] <= study.LATENT
        assert r["metrics"]["kl"] >= 0
    with np.load(tmp_path / "reconstructions.npz") as grids:
        assert len(grids.files) == 1 + len(study.TINY["configs"])
        for key in grids.files:
            assert grids[key].shape == (study.SHOWN, study.D)
            assert np.isfinite(grids[key]).all() and (grids[key] >= 0).all() and (grids[key] <= 1).all()

    # D = 64 is a power of two, so in float64 the two gradients agree to rounding or exactly.
    check = cache["gradient_check"]["binary"]
    assert abs(check["cosine_mean_vs_beta_D"] - 1) < 1e-12
    assert abs(check["norm_ratio_beta_D_over_mean"] - study.D) < 1e-10
    assert check["rel_diff_D_times_mean_vs_beta_D"] < 1e-12
    # ...and the mean over pixels is not the summed ELBO's direction.
    assert check["cosine_mean_vs_sum"] < 0.9

    for name in FIGURES:
        assert (tmp_path / name).stat().st_size > 10_000
        (tmp_path / name).unlink()
    study.main(["--plot-only", "--out", str(tmp_path)])
    for name in FIGURES:
        assert (tmp_path / name).stat().st_size > 10_000

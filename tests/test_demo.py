"""The README's main job, end to end, for a few epochs."""

import torch

from vaekern import demo


def test_demo_trains_and_saves_plots(tmp_path, capsys):
    history = demo.main(["--epochs", "3", "--out", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "epoch   3 | -ELBO" in out and "KL" in out
    assert all(torch.isfinite(torch.tensor(v)).all() for v in history.values())
    assert history["loss"][-1] < history["loss"][0]
    for name in ("reconstructions.png", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 10_000

"""The stop rules the calibration simulates from unstopped trajectories."""

import numpy as np

from eproj.train.calibrate import CAP, FULL_RULE, RULE_GRID, choose_rule, stop_times


def test_stop_times_follow_the_rule_and_the_gate():
    lr = np.array([[5.0, 4.0, 3.0, 2.0],    # under 3.5 after 2 steps
                   [1.0, 1.0, 1.0, 1.0],    # under the threshold at x0
                   [9.0, 8.0, 7.0, 6.0],    # never under: the cap
                   [2.5, 9.0, 9.0, 9.0]])   # under the gate at x0, over the threshold
    assert stop_times(lr, 3.5, 3, None).tolist() == [2, 0, 3, 0]
    assert stop_times(lr, 2.0, 3, None).tolist() == [3, 0, 3, 3]
    # a gated sample (or one under the threshold at x0) keeps the first update, or takes no step
    assert stop_times(lr, 2.0, 3, 2.5).tolist() == [3, 1, 3, 1]
    assert stop_times(lr, 2.0, 3, 2.5, first_update=False).tolist() == [3, 0, 3, 0]
    assert stop_times(lr, None, 3, None).tolist() == [3, 3, 3, 3]
    assert stop_times(lr, None, 0, 100.0).tolist() == [0, 0, 0, 0]
    # the gate on the reconstruction error's largest pixel too: both bounds must hold
    rec_max = np.array([0.1, 0.1, 0.1, 0.9])
    assert stop_times(lr, 2.0, 3, 2.5, rec_max, 0.5, False).tolist() == [3, 0, 3, 3]
    assert stop_times(lr, 2.0, 3, 9.0, rec_max, 0.5, False).tolist() == [0, 0, 0, 3]


def _validation(seed: int, settle: int, defect_lr: float):
    """Four normal and four defective 16x16 images whose defect region drifts linearly from 1 to
    0.5 over ``settle`` iterations; Lr falls as 1/(1+t) (normal) and defect_lr/(1+t) (defective).
    Returns images, masks, normal, iterates, lr and a small reconstruction DSSIM map."""
    rng = np.random.default_rng(seed)
    n, size = 8, 16
    images = rng.random((n, 1, size, size)).astype(np.float32)
    normal = np.arange(n) < 4
    masks = np.zeros((n, size, size), bool)
    masks[~normal, 4:9, 4:9] = True
    images[~normal, :, 4:9, 4:9] = 1.0
    t = np.arange(CAP + 1)
    iterates = np.repeat(images[:, None], CAP + 1, axis=1).astype(np.float16)
    for i in np.nonzero(~normal)[0]:
        iterates[i, :, :, 4:9, 4:9] = (1.0 - 0.5 * np.minimum(t, settle) / settle)[:, None, None, None]
    lr = np.where(normal[:, None], 1.0 / (1 + t), defect_lr / (1 + t))
    recon_dssim = rng.random((n, size, size)).astype(np.float32) * 0.01
    return images, masks, normal, iterates, lr, recon_dssim


def test_the_rule_choice_is_held_to_the_100_iteration_projection():
    images, masks, normal, iterates, lr, recon_dssim = _validation(seed=0, settle=10, defect_lr=5.0)
    rec_max = np.where(normal, 0.1, 0.8)  # the defects show in the reconstruction error
    chosen, table = choose_rule(lr, iterates, images, masks, normal, recon_dssim, train_min=0.02,
                                levels=np.ones(CAP + 1), rec_max=rec_max)
    assert table[0]["rule"] == FULL_RULE and table[0]["mean_iterations"] == CAP and table[0]["gate_lr"] is None
    assert table[1]["rule"] == "training-min"
    assert len(table) == 2 + 4 * len(RULE_GRID)
    gates = {r["gate_lr"] for r in table[2:]}
    assert gates == {None, float(lr[normal, 0].max())}
    assert {r["gate_rec_error"] for r in table[2:] if r["gate_lr"] is not None} == {None, 0.1}
    # normal samples are all under the gate at x0: one step under a gated rule, or none at all
    for r in table[2:]:
        if r["gate_lr"] is not None:
            assert r["mean_iterations_normal"] == (1 if r["gate_first_update"] else 0)
    assert chosen in table[2:]
    assert chosen["pixel_auroc"] >= table[0]["pixel_auroc"] - 0.005 and chosen["aupro"] >= table[0]["aupro"] - 0.005


def test_the_rule_choice_shows_a_progress_bar_only_when_asked(capsys):
    images, masks, normal, iterates, lr, recon_dssim = _validation(seed=0, settle=10, defect_lr=5.0)
    args = (lr, iterates, images, masks, normal, recon_dssim, 0.02, np.ones(CAP + 1))
    quiet = choose_rule(*args)
    assert capsys.readouterr().err == ""
    shown = choose_rule(*args, progress=True)
    err = capsys.readouterr().err
    assert "calibrate: stop rules" in err and f"/{2 + 2 * len(RULE_GRID)} " in err  # two gates without rec_max
    assert shown == quiet


def test_a_short_cap_is_chosen_when_it_keeps_the_quality():
    """Defects projected in two steps: the cheapest rule within the quality slack caps them early."""
    # defects stay over every stop threshold
    images, masks, normal, iterates, lr, recon_dssim = _validation(seed=1, settle=2, defect_lr=50.0)
    chosen, table = choose_rule(lr, iterates, images, masks, normal, recon_dssim, train_min=0.02,
                                levels=np.ones(CAP + 1))
    assert min(cap for _, cap in RULE_GRID) <= 2
    assert chosen["max_iters"] == 2
    assert chosen["mean_iterations_defective"] == 2
    assert chosen["pixel_auroc"] >= table[0]["pixel_auroc"] - 0.005


def test_trajectories_show_a_progress_bar_only_when_asked(capsys):
    from eproj.train.calibrate import trajectories
    from eproj.train.models import ModelConfig, build_model
    from eproj.train.projection import ProjectionConfig

    model = build_model(ModelConfig(family="l2ae", size=32)).eval()
    images = np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)
    quiet = trajectories(model, images, ProjectionConfig(), steps=2, batch=2)
    assert capsys.readouterr().err == ""
    shown = trajectories(model, images, ProjectionConfig(), steps=2, batch=2, progress=True)
    err = capsys.readouterr().err
    assert "calibrate: projection" in err and "/4 " in err  # two batches of two iterations
    for a, b in zip(quiet, shown):
        np.testing.assert_array_equal(a, b)

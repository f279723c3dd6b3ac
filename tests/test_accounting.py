"""Budget accounting: samples seen, distinct samples replayed from the data order, trunk passes."""
from __future__ import annotations

import numpy as np

from test_engine import make_model, toy_dataset, train, base_config
from turbotrain.train.accounting import combine_stages, seen_indices, with_pretraining
from turbotrain.train.balancers import build_balancer
from turbotrain.train.sampling import epoch_permutation


def test_seen_indices_replays_the_epoch_permutations():
    # 10 samples, 4 a step: 2 steps an epoch (samples 8, 9 of each permutation dropped)
    first = epoch_permutation(10, 7, 0)[:8].numpy()
    assert np.array_equal(seen_indices(10, 4, 7, 1), np.sort(first[:4]))
    assert np.array_equal(seen_indices(10, 4, 7, 2), np.sort(first))
    second = epoch_permutation(10, 7, 1)[:4].numpy()
    assert np.array_equal(seen_indices(10, 4, 7, 3), np.union1d(first, second))
    assert len(seen_indices(10, 4, 7, 1000)) == 10  # many epochs cover everything
    assert len(seen_indices(10, 4, 7, 0)) == 0


def test_a_summed_run_spends_one_backward_per_micro_batch(tmp_path):
    config = base_config(max_steps=6, batch_size=8, grad_accum_steps=2, diagnostics_every=1000)
    _, _, summary = train(tmp_path / "sum", config)
    assert summary["steps"] == 6
    assert summary["samples_seen"] == 6 * 8 * 2
    assert summary["trunk_forwards"] == 12 and summary["trunk_backwards"] == 12
    # 48 samples, 16 a step: 3 steps an epoch, so 6 steps read every sample
    assert summary["unique_samples_seen"] == 48


def test_a_parameter_space_balancer_backpropagates_once_per_task(tmp_path):
    config = base_config(max_steps=3, batch_size=8, diagnostics_every=1000)
    model = make_model()
    balancer = build_balancer("pcgrad", ["regression", "classification"])
    _, _, summary = train(tmp_path / "pcgrad", config, model=model, balancer=balancer,
                          shared_params=list(model.trunk.parameters()),
                          task_params={"regression": list(model.regression_head.parameters()),
                                       "classification": list(model.classification_head.parameters())})
    assert summary["trunk_forwards"] == 3
    assert summary["trunk_backwards"] == 3 * 2


def test_pretraining_and_stages_add_up():
    stages = [{"steps": 10, "samples_seen": 40, "trunk_forwards": 10, "trunk_backwards": 10, "wall_s": 1.0},
              {"steps": 5, "samples_seen": 20, "trunk_forwards": 5, "trunk_backwards": 10, "wall_s": 2.0}]
    totals = combine_stages(stages, [np.array([0, 1, 2]), np.array([2, 3])])
    assert totals == {"steps": 15, "samples_seen": 60, "trunk_forwards": 15, "trunk_backwards": 20,
                      "wall_s": 3.0, "unique_samples_seen": 4}
    pretraining = {"steps": 7, "samples_seen": 28, "unique_samples_seen": 9, "trunk_forwards": 7,
                   "trunk_backwards": 7, "wall_s": 0.5}
    both = with_pretraining(totals, pretraining)
    assert both["total_steps"] == 22 and both["pretrain_unique_samples_seen"] == 9
    assert "total_unique_samples_seen" not in both and both["unique_samples_seen"] == 4
    assert with_pretraining(totals, None)["total_trunk_backwards"] == 20

"""Trajectory self-supervision (SmartPretrain): windows, masking, contrast, momentum, export."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turbotrain.data.sample import Sample, collate
from turbotrain.models.motion import AgentInteraction, TrackEncoder
from turbotrain.pretrain.trajectory import TrackWindow, TrajectorySSL, agent_identities, draw_windows, segment_mask

HISTORY, FUTURE, HIDDEN = 3, 10, 32


def _track(speed: float, turn: float, heading: float, origin: tuple[float, float], steps: int) -> np.ndarray:
    """(steps, 3) x, y, yaw of an agent at constant speed (m/step) and turn rate (rad/step)."""
    yaw = heading + turn * np.arange(steps)
    xy = np.cumsum(speed * np.stack([np.cos(yaw), np.sin(yaw)], axis=1), axis=0) + np.array(origin)
    return np.concatenate([xy, yaw[:, None]], axis=1).astype(np.float32)


def _tracks_sample(scene: int, motions: list[tuple[float, float]]) -> Sample:
    steps = HISTORY + FUTURE
    rng = np.random.default_rng(scene)
    tracks = np.stack([_track(s, t, rng.uniform(-math.pi, math.pi), tuple(rng.uniform(-30, 30, 2)), steps)
                       for s, t in motions])
    boxes = np.zeros((len(motions), 7), np.float32)
    boxes[:, :2], boxes[:, 6] = tracks[:, HISTORY - 1, :2], tracks[:, HISTORY - 1, 2]
    boxes[:, 3:6] = (4.5, 1.9, 1.6)
    return Sample(
        sample_id=f"train/scene{scene}/1/{scene:06d}", frames=[], boxes=boxes,
        classes=np.zeros(len(motions), np.int64), track_ids=np.arange(len(motions), dtype=np.int64),
        history=tracks[:, :HISTORY], history_valid=np.ones((len(motions), HISTORY), bool),
        future=tracks[:, HISTORY:], future_valid=np.ones((len(motions), FUTURE), bool),
    )


def _toy_batch():
    speeds, turns = [0.3, 0.8, 1.4, 2.0], [-0.15, 0.0, 0.15]
    motions = [(s, t) for s in speeds for t in turns]
    return collate([_tracks_sample(k, motions[3 * k:3 * k + 3]) for k in range(4)])


def _ssl(**options) -> TrajectorySSL:
    torch.manual_seed(0)
    options = {"window": 5, **options}
    return TrajectorySSL(TrackEncoder(HIDDEN), AgentInteraction(HIDDEN, heads=4), HIDDEN, HISTORY + FUTURE, **options)


def test_the_two_windows_never_overlap_and_stay_inside_the_track():
    generator = torch.Generator().manual_seed(0)
    for length, window in [(13, 5), (10, 5), (13, 3), (40, 7)]:
        starts = draw_windows(length, window, 500, generator)
        assert (starts[:, 1] >= starts[:, 0] + window).all()
        assert (starts >= 0).all() and (starts[:, 1] + window <= length).all()
        if length > 2 * window:  # there is room to move: both the position and the gap vary
            assert len(set(starts[:, 0].tolist())) > 1 and len(set((starts[:, 1] - starts[:, 0]).tolist())) > 1
    with pytest.raises(ValueError, match="need a track of 10 steps"):
        draw_windows(9, 5, 1)


def test_one_contiguous_segment_is_hidden_and_never_the_anchor_step():
    hidden = segment_mask((200, 3), window=5, mask_steps=2, generator=torch.Generator().manual_seed(1))
    assert (hidden.sum(-1) == 2).all() and not hidden[..., -1].any()
    first = hidden.int().argmax(-1)
    assert hidden.gather(-1, (first + 1)[..., None]).all()  # the two steps are adjacent
    with pytest.raises(ValueError, match="mask_steps"):
        segment_mask((1, 1), window=5, mask_steps=5)


def test_masked_segments_are_not_visible_to_the_encoder():
    ssl = _ssl(reconstruction="inpaint").eval()
    batch = _toy_batch()
    win = ssl.windows(batch, torch.Generator().manual_seed(0))[0][0]
    hidden = segment_mask(win.present.shape, 5, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = ssl.embed(win, hidden)
        win.inputs = torch.where(hidden[..., None], win.inputs + 100.0, win.inputs)  # change only what is hidden
        win.valid = win.valid & ~(hidden & (torch.rand(hidden.shape) < 0.5))
        after = ssl.embed(win, hidden)
        unmasked = ssl.embed(win)
    assert torch.equal(before, after)
    assert not torch.allclose(before, unmasked)


def test_windows_are_in_the_anchor_frame():
    batch = _toy_batch()
    track = torch.cat([batch.history, batch.future], dim=2)
    valid = torch.ones(track.shape[:-1], dtype=torch.bool)
    win = TrackWindow(track, valid, torch.tensor([2, 2, 2, 2]), 5, batch.box_mask)
    assert torch.allclose(win.xy[..., -1, :], torch.zeros(2), atol=1e-5)  # the anchor is the origin
    straight = win.xy[0, 1]  # agent 1 of scene 0 drives straight: its track lies on the x axis, behind it
    assert torch.allclose(straight[:, 1], torch.zeros(5), atol=1e-4) and (straight[:-1, 0] < 0).all()


def test_input_noise_moves_every_step_but_the_anchor_and_leaves_the_targets_clean():
    batch = _toy_batch()
    track = torch.cat([batch.history, batch.future], dim=2)
    valid = torch.ones(track.shape[:-1], dtype=torch.bool)
    clean = TrackWindow(track, valid, torch.tensor([2, 2, 2, 2]), 5, batch.box_mask)
    noisy = TrackWindow(track, valid, torch.tensor([2, 2, 2, 2]), 5, batch.box_mask, noise_m=0.2,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy.xy, clean.xy) and torch.equal(clean.inputs, clean.xy)
    assert torch.equal(noisy.inputs[..., -1, :], clean.xy[..., -1, :])  # the anchor stays the origin
    error = (noisy.inputs - clean.xy)[..., :-1, :]
    assert float(error.std()) == pytest.approx(0.2, rel=0.25) and abs(float(error.mean())) < 0.05
    ssl = _ssl(input_noise_m=0.2)
    first, second = ssl.windows(batch, torch.Generator().manual_seed(3))[0]
    assert not torch.equal(first.inputs, first.xy) and not torch.equal(second.inputs, second.xy)


def test_contrastive_loss_ranks_the_positive_pair_first_after_a_few_steps():
    ssl = _ssl()  # SmartPretrain's settings: forward direction, no queue
    ssl.total_updates = 60
    batch = _toy_batch()
    optimizer = torch.optim.Adam([p for p in ssl.parameters() if p.requires_grad], lr=3e-3)
    ssl.eval()
    with torch.no_grad():
        first = ssl(batch)
    ssl.train()
    for _ in range(60):
        out = ssl(batch)
        optimizer.zero_grad()
        (out["contrastive"] + out["trajectory_reconstruction"]).backward()
        optimizer.step()
    ssl.eval()
    with torch.no_grad():
        last = ssl(batch)
    assert last["log"]["agent_pairs"].item() == 12
    assert last["log"]["positive_top1"].item() == 1.0
    assert last["contrastive"].item() < 0.5 * first["contrastive"].item()
    assert last["trajectory_reconstruction"].item() < first["trajectory_reconstruction"].item()


def test_momentum_rises_from_its_base_to_one_and_the_key_encoder_trails_the_online_one():
    ssl = _ssl(momentum=0.9)
    ssl.total_updates = 10
    assert ssl.momentum() == pytest.approx(0.9)
    online = ssl.encoder.gru.weight_hh_l0
    key = ssl.momentum_branch["encoder"].gru.weight_hh_l0
    with torch.no_grad():
        online.add_(1.0)
    before = key.clone()
    ssl.update_momentum_branch()
    assert torch.allclose(key, before + 0.1, atol=1e-6)  # (1 - 0.9) of the way
    ssl.updates.fill_(10)
    assert ssl.momentum() == pytest.approx(1.0)
    assert not key.requires_grad


def test_same_object_in_another_sample_is_not_a_negative():
    ids = agent_identities(["train/s/1/000", "train/s/2/000", "train/t/1/000"], torch.tensor([[4], [4], [4]]))
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], ids[2])
    ids = ids.view(3, 2)
    ssl = _ssl(queue_size=4, projection_dim=2)
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), dim=-1)
    k = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1], [0.2, 0.9], [0.5, 0.5]]), dim=-1)
    # keys: the three first-window keys (columns 0-2), then the three positives (columns 3-5)
    keys, key_ids, positive = torch.cat([q, k]), torch.cat([ids, ids]), torch.tensor([3, 4, 5])
    loss, top1 = ssl.contrast(q, keys, ids, key_ids, positive)
    # query 0 (object A in sample 1): its own key (0) and object A's keys seen from sample 2 (1, 4)
    # are left out; negatives: object B's keys (2, 5). Likewise for query 1; query 2 (object B) keeps
    # A's four keys as negatives and loses its own key (2).
    sims, inf = q @ keys.T, float("-inf")
    keep = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    logits = sims.masked_fill(~keep, inf) / 0.07
    expected = torch.nn.functional.cross_entropy(logits, positive) * 2 * 0.07  # x 2T, as released
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a queued key of another object is a negative; one of the same object is not
    ssl.enqueue(torch.tensor([[0.6, 0.8], [1.0, 0.0]]), torch.tensor([[9, 9], ids[0].tolist()]))
    with_queue, _ = ssl.contrast(q, keys, ids, key_ids, positive)
    assert with_queue.item() > loss.item()
    assert ssl.queue_filled.sum() == 2


def test_the_forecast_target_is_the_second_window_in_the_first_windows_frame():
    # One agent driving straight along +x at 1 m/step, heading 0: 13 steps x = 0..12.
    ssl = _ssl(window=3)
    track = torch.zeros(1, 1, 13, 3)
    track[0, 0, :, 0] = torch.arange(13.0)
    valid = torch.ones(1, 1, 13, dtype=torch.bool)
    valid[0, 0, 7] = False  # one step missing inside the second window
    starts = torch.tensor([[1, 6]])  # windows: steps 1-3 and 6-8
    first = TrackWindow(track, valid, starts[:, 0], 3, torch.ones(1, 1, dtype=torch.bool))
    positions, scored, after = ssl.forecast_targets(track, valid, starts, first)
    # the first window's anchor is step 3 (x = 3): step k is (k - 3, 0) in its frame
    assert torch.allclose(positions[0, 0, :, 0], torch.arange(13.0) - 3) and positions[0, 0, :, 1].abs().max() < 1e-6
    # scored: steps 4..8 (after the first window up to the end of the second), step 7 invalid
    assert scored[0, 0].nonzero().flatten().tolist() == [4, 5, 6, 8]
    assert after[0].nonzero().flatten().tolist() == list(range(4, 13))
    # a decoder that outputs 1 m per step along x forecasts exactly: loss 0; 2 m per step: steps 4..8
    # are off by 1, 2, 3, 5 m (step 7 unscored): SmoothL1 0.5, 1.5, 2.5, 4.5 -> mean 2.25
    del ssl.decoder  # replaced by fixed forecasts below
    for speed, expected in ((1.0, 0.0), (2.0, 2.25)):
        deltas = torch.zeros(1, 13, 2)
        deltas[..., 0] = speed
        ssl.decoder = lambda x, d=deltas: d.flatten(1)  # noqa: E731 (a fixed forecast)
        loss = ssl.forecasting(torch.zeros(1, ssl.start_embedding.shape[1]), torch.ones(1, 1, dtype=torch.bool),
                               starts, (positions, scored, after))
        assert loss.item() == pytest.approx(expected)


def test_export_loads_into_the_prediction_head_of_the_joint_model(tmp_path):
    from turbotrain.grid import Grid
    from turbotrain.models.joint import CooperativePnP
    from turbotrain.pretrain.transfer import load_pretrained, save_pretrained

    grid = Grid.from_config({"point_cloud_range": [-12.8, -12.8, -3, 12.8, 12.8, 1], "voxel_size": [0.4, 0.4, 0.5],
                             "bev_stride": 2})
    cfg = {"size": "tiny", "encoder": {"name": "second", "backend": "torch"}, "bev_backbone": {"name": "resnet_fpn"},
           "fusion": {"name": "attfuse"}, "temporal": {"name": "attention"}, "detection_head": {"name": "center"},
           "prediction_head": {"name": "multimodal"}}
    source = CooperativePnP(cfg, grid, ["car"], history=HISTORY, future=FUTURE)
    head = source.prediction_head
    ssl = TrajectorySSL(head.motion_encoder, head.interaction, head.history_gru.hidden_size, HISTORY + FUTURE)
    with torch.no_grad():
        for p in ssl.momentum_branch.parameters():
            p.fill_(0.25)
    save_pretrained(tmp_path / "p.pt", ssl.export(), ssl.export_groups, {"type": "trajectory"})
    target = CooperativePnP(cfg, grid, ["car"], history=HISTORY, future=FUTURE)
    report = load_pretrained(target, tmp_path / "p.pt")
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    assert all(k.startswith(("prediction_head.motion_encoder.", "prediction_head.interaction.")) for k in report.loaded)
    assert (target.prediction_head.motion_encoder.gru.weight_hh_l0 == 0.25).all()
    assert not (target.prediction_head.trunk[0].weight == 0.25).all()

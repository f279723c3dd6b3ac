"""Pretrained weights reach the fine-tuning model, only in the variant's groups, with an honest key report."""
from __future__ import annotations

import pytest
import torch

from turbotrain.grid import Grid
from turbotrain.models.joint import PART_GROUPS, CooperativePnP
from turbotrain.testing import ToySceneConfig, toy_batch
from turbotrain.pretrain.objective import VARIANT_INPUT, MaskedReconstruction
from turbotrain.pretrain.transfer import TransferError, group_state, load_pretrained, pretrained_meta, save_pretrained
from turbotrain.utils.errors import DataError
from turbotrain.utils.seed import seed_everything

CLASSES = ["car", "pedestrian", "truck"]
GRID = Grid((-9.6, -9.6, -3.0, 9.6, 9.6, 1.0), (0.4, 0.4, 0.5), 2)
FINETUNE_HISTORY = 2
SPATIOTEMPORAL_GROUPS = ("encoder", "bev_backbone", "fusion", "temporal")


def build_model(seed: int, history: int = FINETUNE_HISTORY) -> CooperativePnP:
    seed_everything(seed)
    cfg = {"size": "tiny", "encoder": {"name": "second"}, "bev_backbone": {"name": "resnet_fpn"},
           "fusion": {"name": "attfuse_mha"}, "temporal": {"name": "attention"},
           "detection_head": {"name": "center"}, "prediction_head": {"name": "multimodal"}}
    return CooperativePnP(cfg, GRID, CLASSES, history, future=4)


def pretrained_model(variant_type: str) -> CooperativePnP:
    """A model after two masked-reconstruction steps, with the history the pretrain stage gives it."""
    history = VARIANT_INPUT[variant_type]["history"] or FINETUNE_HISTORY
    model = build_model(seed=1, history=history)
    objective = MaskedReconstruction(model, GRID, {"mask_ratio": 0.7}, history, model.encoder.vfe.out_channels,
                                     model.bev_backbone.out_channels)
    batch = toy_batch(GRID, (ToySceneConfig(history=history, future=4, num_objects=2, points_per_box=150,
                                            ground_points=200),), seed=2)
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        objective(batch)["reconstruction"].backward()
        optimizer.step()
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def group_of(key: str) -> str:
    return key.split(".", 1)[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{variant type: (pretrained state, pretrained.pt path)}`` for each pretraining variant."""
    root = tmp_path_factory.mktemp("transfer")
    out = {}
    for variant_type, spec in VARIANT_INPUT.items():
        model = pretrained_model(variant_type)
        path = root / f"{variant_type}.pt"
        save_pretrained(path, model, spec["transfer"], {"variant": variant_type})
        out[variant_type] = (snapshot(model), path)
    return out


def test_variants_transfer_the_documented_groups():
    assert VARIANT_INPUT["ego_only"]["transfer"] == ("encoder",)
    assert VARIANT_INPUT["multi_agent"]["transfer"] == ("encoder",)
    assert VARIANT_INPUT["spatiotemporal"]["transfer"] == SPATIOTEMPORAL_GROUPS


@pytest.mark.parametrize("variant_type", ["ego_only", "multi_agent", "spatiotemporal"])
def test_loading_replaces_the_transferred_groups_and_keeps_the_rest(exported, variant_type):
    pretrained, path = exported[variant_type]
    groups = VARIANT_INPUT[variant_type]["transfer"]
    model = build_model(seed=2)
    init = snapshot(model)

    report = load_pretrained(model, path)

    after = model.state_dict()
    transferred = [k for k in after if group_of(k) in groups]
    assert sorted(report.loaded) == sorted(transferred)
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    for key, value in after.items():
        expected = pretrained[key] if group_of(key) in groups else init[key]
        assert torch.equal(value, expected), key
    # the fine-tuning start really moved: the transferred weights are not the fresh initialisation
    changed = {group_of(k) for k in transferred if not torch.equal(after[k], init[k])}
    assert changed == set(groups)
    assert set(groups) < set(PART_GROUPS)


def test_a_checkpoint_whose_keys_match_nothing_is_refused(exported, tmp_path):
    pretrained, path = exported["spatiotemporal"]
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {f"backbone3d.{k}": v for k, v in payload["state_dict"].items()}
    renamed = tmp_path / "renamed.pt"
    torch.save(payload, renamed)
    model = build_model(seed=2)
    init = snapshot(model)
    with pytest.raises(TransferError, match="no pretrained tensor matched"):
        load_pretrained(model, renamed)
    assert all(torch.equal(v, init[k]) for k, v in model.state_dict().items())


def test_a_file_that_is_not_a_pretrained_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(build_model(seed=0).state_dict(), path)  # a bare state dict, no "state_dict" entry
    with pytest.raises(DataError, match="weights.pt: field 'state_dict': expected a pretrained checkpoint"):
        load_pretrained(build_model(seed=2), path)


def test_shape_mismatch_missing_and_unexpected_keys_are_reported(exported, tmp_path):
    pretrained, path = exported["ego_only"]
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"]
    weights = [k for k, v in state.items() if v.ndim >= 2]
    reshaped, dropped = weights[0], weights[1]
    state[reshaped] = torch.zeros(3, 3)
    del state[dropped]
    state["encoder.legacy_head.weight"] = torch.zeros(2)
    edited = tmp_path / "edited.pt"
    torch.save(payload, edited)

    model = build_model(seed=2)
    init = snapshot(model)
    report = load_pretrained(model, edited)

    assert report.shape_mismatch == [f"{reshaped}: checkpoint (3, 3) vs model {tuple(init[reshaped].shape)}"]
    assert report.missing == [dropped]
    assert report.unexpected == ["encoder.legacy_head.weight"]
    encoder_keys = [k for k in init if group_of(k) == "encoder"]
    assert len(report.loaded) == len(encoder_keys) - 2
    after = model.state_dict()
    assert torch.equal(after[reshaped], init[reshaped]) and torch.equal(after[dropped], init[dropped])
    summary = report.summary()
    assert (summary["loaded"], summary["missing"], summary["unexpected"], summary["shape_mismatch"]) == (
        len(encoder_keys) - 2, 1, 1, 1)
    assert summary["unexpected_keys"] == ["encoder.legacy_head.weight"] and summary["missing_keys"] == [dropped]


# What `turbotrain pretrain` put in `meta` before meta went through JSON: tuples, nested config
# dicts, floats, None (the shape of stages/pretrain.py's meta, values shortened).
OLD_META = {"variant": "spatiotemporal", "type": "spatiotemporal", "mask_ratio": 0.7, "fusion": "attfuse",
            "pretrain_data": [{"name": "synthetic", "samples": 12, "cache_config_hash": "ab" * 32, "class_map": {}}],
            "history": 2, "steps": 3, "wall_s": 12.5, "transfer": ("encoder", "bev_backbone"), "datasets": None,
            "temporal_masking": True, "commit": "unknown"}


def test_a_pretrained_file_saved_the_old_way_still_loads(tmp_path):
    """Files written before the weights-only change: the same dict, torch.save'd with raw meta."""
    groups = VARIANT_INPUT["spatiotemporal"]["transfer"]
    source = pretrained_model("spatiotemporal")
    path = tmp_path / "pretrained.pt"
    torch.save({"state_dict": group_state(source, groups), "groups": list(groups), "meta": OLD_META}, path)
    model = build_model(seed=2)
    report = load_pretrained(model, path)
    assert sorted(report.loaded) == sorted(group_state(source, groups))
    assert pretrained_meta(path) == OLD_META


def test_meta_is_stored_as_plain_json_data(tmp_path):
    path = tmp_path / "pretrained.pt"
    save_pretrained(path, build_model(seed=0), ("encoder",), {"transfer": ("encoder",), "where": tmp_path})
    assert pretrained_meta(path) == {"transfer": ["encoder"], "where": str(tmp_path)}
    with pytest.raises(TypeError, match="cannot serialise object"):
        save_pretrained(tmp_path / "other.pt", build_model(seed=0), ("encoder",), {"bad": object()})
    assert not (tmp_path / "other.pt").exists()

"""The fine-tuning stage: the multi-stage recipe freezes exactly what each stage says."""
import pytest
import torch

from turbotrain.config import load_config
from turbotrain.data.synth import generate_dataset
from turbotrain.contract import Run
from turbotrain.stages.data import fuse
from turbotrain.stages.finetune import finetune
from turbotrain.train.recipes import recipe_stages

STAGES = [
    {"name": "detection", "tasks": ["detection"], "agents": "ego", "max_steps": 2},
    {"name": "prediction", "tasks": ["prediction"], "agents": "ego", "max_steps": 2,
     "freeze": ["encoder", "bev_backbone", "detection_head"]},
    {"name": "joint", "tasks": ["detection", "prediction"], "agents": "all", "max_steps": 2,
     "loss_weights": {"detection": 1.0, "prediction": 0.5}},
]
OVERRIDES = [f"finetune.multistage.stages={STAGES}", "evaluation.curve_samples=0", "train.batch_size=2",
             "train.lr=0.01", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    config = load_config("config/smoke.yaml", OVERRIDES)
    generate_dataset(root / "raw", preset="smoke", seed=0, progress=False,
                     overrides={"splits": {"train": 1, "val": 0, "test": 0}, "frames": 10})
    fuse(config, root / "raw", "train", root / "cache")
    return config, str(root / "cache")


def params_by_group(path) -> dict[str, dict[str, torch.Tensor]]:
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model_params = {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in model_params.items():
        groups.setdefault(key.split(".", 1)[0], {})[key] = value
    return groups


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_recipe_stages_follow_the_config(tiny_cache):
    config, _ = tiny_cache
    run = Run("synthetic_smoke", "attfuse", "none", "multistage", "fixed", 1.0, 0)
    stages = recipe_stages(config, run)
    assert [s.name for s in stages] == ["detection", "prediction", "joint"]
    assert stages[1].freeze == ["encoder", "bev_backbone", "detection_head"]
    assert stages[2].balancer == "fixed" and stages[2].balancer_options == {"weights": {"detection": 1.0, "prediction": 0.5}}
    joint = recipe_stages(config, Run("synthetic_smoke", "attfuse", "none", "joint", "pcgrad", 1.0, 0))
    assert len(joint) == 1 and joint[0].balancer == "pcgrad" and joint[0].tasks == ["detection", "prediction"]


def test_multistage_freezes_exactly_what_each_stage_says(tiny_cache, tmp_path):
    config, cache = tiny_cache
    run = Run("synthetic_smoke", "attfuse", "none", "multistage", "fixed", 1.0, 0)
    summary = finetune(config, run, cache, None, str(tmp_path))
    assert summary["steps"] == 6
    first, second, third = (params_by_group(tmp_path / "stages" / d / "final.pt")
                            for d in ("1-detection", "2-prediction", "3-joint"))
    # stage 2 trains prediction only, with encoder, BEV backbone and detection head frozen
    for group in ("encoder", "bev_backbone", "detection_head"):
        assert not changed(first[group], second[group]), group
    for group in ("prediction_head", "temporal"):
        assert changed(first[group], second[group]), group
    # stage 3 unfreezes everything again
    for group in ("encoder", "bev_backbone", "detection_head", "prediction_head"):
        assert changed(second[group], third[group]), group
    assert (tmp_path / "final.pt").exists() and (tmp_path / "summary.json").exists()


def test_the_final_weights_are_the_curves_last_point_recalibrated_once(tmp_path, monkeypatch):
    """final.pt takes the BatchNorm statistics the curve's last point recomputed for the same weights
    and data, instead of recomputing them: the same tensors as a fresh recalibration, one pass fewer."""
    import turbotrain.stages.finetune as stage
    import turbotrain.train.curve as curve
    from turbotrain.build import FUSION_MODES, build_model, fused_dataset
    from turbotrain.train.checkpoint import load_checkpoint

    config = load_config("config/smoke.yaml", ["evaluation.curve_samples=2", "train.batch_size=2",
                                               "train.checkpoint_every=2", "finetune.joint.max_steps=4"])
    generate_dataset(tmp_path / "raw", preset="smoke", seed=0, progress=False,
                     overrides={"splits": {"train": 1, "val": 1, "test": 0}, "frames": 10})
    for split in ("train", "val"):
        fuse(config, tmp_path / "raw", split, tmp_path / "cache")
    calls = []
    real = curve.recalibrate_batchnorm
    monkeypatch.setattr(curve, "recalibrate_batchnorm", lambda *a, **k: (calls.append(1), real(*a, **k)))
    monkeypatch.setattr(stage, "recalibrate_batchnorm", lambda *a, **k: (calls.append(1), real(*a, **k)))
    run = Run("synthetic_smoke", "attfuse", "none", "joint", "sum", 1.0, 0)
    out = tmp_path / "run"
    finetune(config, run, str(tmp_path / "cache"), None, str(out))
    assert len(calls) == 2  # the curve's points at steps 2 and 4; none more for final.pt

    model = build_model(config, "attfuse")
    model.load_state_dict(load_checkpoint(out / "stages" / "1-joint" / "final.pt")["model"])
    real(model, fused_dataset(config, str(tmp_path / "cache"), "train", FUSION_MODES["attfuse"][0], 1.0), run.seed)
    final = load_checkpoint(out / "final.pt")["model"]
    assert any("running_mean" in k for k in final)
    for key, value in model.state_dict().items():
        assert torch.equal(final[key], value), key

"""The label-file YAML writer: valid YAML that PyYAML reads back to the same document."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import yaml

from turbotrain.data.opencood import record_to_frame_yaml
from turbotrain.data.records import AgentFrameRecord, ObjectRecord
from turbotrain.utils import fast_yaml

TRICKY_FLOATS = [0.0, -0.0, 1.0, -2.5, 1e-05, 1e20, 1.5e-300, 5e-324, 1.7976931348623157e308, 0.1 + 0.2,
                 123456789.123456789, -1e-7, math.pi, float("inf"), float("-inf")]


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def test_floats_round_trip_bit_for_bit():
    rng = np.random.default_rng(0)
    values = TRICKY_FLOATS + [float(v) for v in rng.normal(0, 1e3, 200)] + [float(v) for v in 10.0 ** rng.uniform(-30, 30, 200)]
    loaded = yaml.safe_load(fast_yaml.dumps({"values": values}))["values"]
    assert all(isinstance(v, float) for v in loaded)
    assert [_bits(v) for v in loaded] == [_bits(v) for v in values]
    assert math.isnan(yaml.safe_load(fast_yaml.dumps({"x": float("nan")}))["x"])


def test_frame_yaml_reads_back_identical():
    rng = np.random.default_rng(1)
    objects = [ObjectRecord(track_id=i, obj_type=t, box=rng.normal(0, 30, 7), speed=float(rng.uniform(0, 20)),
                            pitch=float(rng.normal(0, 0.05))) for i, t in enumerate(["car", "pedestrian", "truck"], start=3)]
    record = AgentFrameRecord(scenario="s", agent_id=-1, timestamp="000004", lidar_pose=rng.normal(0, 50, 6),
                              points=np.zeros((0, 4), np.float32), objects=objects, ego_speed=1e-5)
    document = record_to_frame_yaml(record)
    text = fast_yaml.dumps(document)
    assert yaml.safe_load(text) == document
    assert yaml.load(text, Loader=yaml.CSafeLoader) == document  # the loader the reader uses
    assert text.startswith("lidar_pose: [") and "\nvehicles:\n  3:\n    location: [" in text


def test_no_objects_and_awkward_strings():
    document = {"vehicles": {}, "a": [], "names": ["yes", "null", "1.5", "car", "two words", "", "-x", "ü: #"],
                "flag": True, "none": None, "n": -3, "nested": [[1, 2.0], []]}
    assert yaml.safe_load(fast_yaml.dumps(document)) == document


@pytest.mark.parametrize("bad", [{"x": np.float32(1.0)}, {"x": object()}, ["not", "a", "mapping"]])
def test_unsupported_values_raise(bad):
    with pytest.raises(TypeError):
        fast_yaml.dumps(bad)

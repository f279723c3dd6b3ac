import numpy as np

from turbotrain.data.cache.labels import LabelMaker
from turbotrain.data.records import ObjectRecord
from turbotrain.grid import Grid


def test_the_ego_vehicle_annotated_by_a_cooperator_is_not_a_label():
    grid = Grid((-20, -10, -3, 20, 10, 3), (0.4, 0.4, 0.5), 2)
    ego_pose = np.array([100.0, 50.0, 1.9, 0.0, 90.0, 0.0])  # sensor on the roof, heading +y
    ego_box = ObjectRecord(7, "car", np.array([100.0, 50.5, 0.8, 4.5, 1.9, 1.6, np.pi / 2]))
    other = ObjectRecord(8, "car", np.array([100.0, 60.0, 0.8, 4.5, 1.9, 1.6, np.pi / 2]))
    labels = LabelMaker(grid, ["car"]).make(ego_pose, {7: ego_box, 8: other}, [{7: ego_box, 8: other}], [{8: other}])
    assert labels.track_ids.tolist() == [8]
    assert np.allclose(labels.boxes[0, :2], [10.0, 0.0], atol=1e-5)  # 10 m ahead of the ego

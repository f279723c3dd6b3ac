"""Pictures of samples and predictions (bird's-eye view)."""
from turbotrain.viz.bev import plot_sample_bev

__all__ = ["plot_sample_bev"]

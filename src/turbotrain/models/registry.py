"""Name -> class registries: every model part is picked by name from config."""
from __future__ import annotations

from typing import Any, Callable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable:
        def decorator(obj):
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} '{name}'; expected one of {sorted(self._items)}")
        return self._items[name]

    def build(self, name: str, *args, **kwargs) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)


ENCODERS = Registry("encoder")
BEV_BACKBONES = Registry("bev_backbone")
FUSERS = Registry("fusion")
TEMPORAL = Registry("temporal")
DETECTION_HEADS = Registry("detection_head")
PREDICTION_HEADS = Registry("prediction_head")

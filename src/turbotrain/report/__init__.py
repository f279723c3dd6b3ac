"""Report artefacts: result tables (:mod:`.tables`) and figures (:mod:`.figures`).

Submodules are not imported here so that building tables does not load matplotlib/seaborn.
"""

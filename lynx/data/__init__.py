"""HaluBench-style data: source loaders, perturbation, reasoning targets and the dataset builder.

`python -m lynx.data build --out DIR --seed 17` builds everything; see lynx/data/build.py.
"""

from lynx.data.sources import SOURCES, Row, load_source

__all__ = ["SOURCES", "Row", "load_source"]

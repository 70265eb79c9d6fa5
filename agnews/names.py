"""The names that steps share: run tags, metric names, artifact names and version tags.

``train``, ``register``, ``mirror``, ``tune``, ``monitor`` and the benchmarks read and write these; no other module
spells them as literals (tests/code/test_names.py checks).
"""

from __future__ import annotations

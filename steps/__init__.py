"""The entry points, one module per step, each run as ``python -m steps.<step>`` with Hydra overrides."""

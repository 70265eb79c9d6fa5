"""The promotion wing: what the register and mirror steps and the webhook do after training.

- ``gate``: register's quality gate and the test set identity it compares.
- ``registry``: register's Model Registry work: versions, aliases, promotion, rollback.
- ``register``: the register step: reconcile, registry update and mirror, under the model's lease.
- ``mirror``: the mirror step: @champion's bundle copied to storage, the pointer moved, the decision to reconcile.
- ``history``: the promotion history in storage (``steps.history`` reads it).
- ``receiver``: ``steps.webhook serve``: signed deliveries and the reconcile loop.
- ``webhook_admin``: ``steps.webhook register``/``unregister`` through MLflow's webhook API.

Outside this package, only the orchestration (``agnews.pipeline``, ``agnews.tuning``) imports it; it imports no
training code (pyproject.toml's import-linter contracts).
"""

"""Monitoring the served model: the captured answers of a window (``captures``) against each version's reference
profile (``reference``), with Evidently's drift tests (``drift``), live accuracy from labels (``labels``), a rollout's
candidate judged against the champion (``candidate``), and the ``monitor`` step's run (``watch``)."""

"""Batch scoring: a whole dataset through a registered version's ONNX int8 bundle, on this machine or on Spark.

``rows`` is what runs where the rows are scored (a local worker process or a Spark executor): the bundle's digest
check, the Lambda's ``bundle.Predictor`` and the output's columns; it imports neither MLflow nor Spark. ``source``
reads the input, ``output`` commits the result whole, ``model`` fetches the version's bundle from the registry,
``local`` and ``spark`` are the two engines, and ``job`` ties them into the step's one MLflow run.
"""

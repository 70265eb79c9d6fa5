"""The serving contract, shared by the pipeline that writes a serving bundle and the Lambda that serves it.

Torch-free: ``layout`` names the bundle's files and reads and writes its ``config.json`` and the mirror's
``manifest.json`` and ``champion.json``; ``predictor`` runs a bundle with ONNX Runtime and ``tokenizers``; ``capture``
defines the record the Lambda keeps of each answer and parses it back.
"""

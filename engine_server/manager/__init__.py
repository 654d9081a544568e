"""The manager: each application's DAG of requests and semantic variables.

Pure Python over protocol messages; it never imports torch (only engine
workers own tensors).
"""

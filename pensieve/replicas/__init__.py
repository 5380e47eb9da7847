"""Serving one model from several Pensieve replicas behind vllm-router (docs/REPLICAS.md)."""

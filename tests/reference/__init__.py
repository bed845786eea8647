"""Our PyTorch reference of AF2 (torch + transformers only): the oracle for parity tests and the benchmarks' baseline."""

from tests.reference.af2_torch import AF2Reference, original_schema, qwen_config

__all__ = ["AF2Reference", "original_schema", "qwen_config"]

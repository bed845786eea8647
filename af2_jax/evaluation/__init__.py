"""Evaluation on benchmarks (`python -m af2_jax.eval`, eval/README.md): `config` (the YAML config and its checks),
`data` (a benchmark's items from its manifest), `scoring` (the metric table, results and report; no model), `runner`
(the OUT folder and the predictions made on the engine). Layer 4: built on the engine and `af2_jax.metrics`."""

from af2_jax.evaluation.config import Benchmark, Decoding, EvalConfig, EvalConfigError, load_eval_config
from af2_jax.evaluation.runner import EvalOutput, plan, predict, score_folder, write_results

__all__ = ["Benchmark", "Decoding", "EvalConfig", "EvalConfigError", "EvalOutput", "load_eval_config", "plan",
           "predict", "score_folder", "write_results"]

"""Training metrics: TensorBoard event files (tensorboardX), `metrics.jsonl`, the console, and optionally Weights &
Biases.

Everything TensorBoard shows of a run lies in one folder, `out_dir/tensorboard/`: the scalars, the config (HPARAMS
and TEXT tabs), sample answers (TEXT), and the `jax.profiler` trace of `run.profile_steps` (PROFILE tab, under
`plugins/profile/`, where `jax.profiler.start_trace(folder)` writes it).
"""

from __future__ import annotations

import html
import json
import logging
import re
import sys
import time
import uuid
from pathlib import Path

import yaml

from af2_jax.training.config import ConfigError, TrainConfig, keys

log = logging.getLogger(__name__)

# Sample answers per validation set written at each exact-match evaluation.
SAMPLE_ANSWERS = 5


class MetricsWriter:
    """Writes a run's metrics to `out_dir/tensorboard/` (`logdir`: TensorBoard events and `metrics.jsonl`), and to
    Weights & Biases when `wandb_project` is set; a disabled writer (every process but 0) writes nothing.
    `resumed_at`: the checkpoint step a resumed run starts from; TensorBoard then drops what the interrupted run had
    written after it, so the steps run again are not drawn twice."""

    def __init__(self, out_dir, enabled: bool = True, resumed_at: int | None = None, wandb_project: str = ""):
        self.logdir = Path(out_dir) / "tensorboard"
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # imports torch when installed: only the writing process pays

        self.logdir.mkdir(parents=True, exist_ok=True)
        # tensorboardX names the event file by the second, and a writer started in the same second would overwrite
        # it: the suffix makes each file unique and keeps the names in start order, the order TensorBoard reads.
        self._board = SummaryWriter(str(self.logdir), purge_step=None if resumed_at is None else resumed_at + 1,
                                    filename_suffix=f".{time.time_ns()}")
        self._jsonl = open(self.logdir / "metrics.jsonl", "a")
        if wandb_project:
            self._wandb = _wandb_run(wandb_project, Path(out_dir))

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        for tag, value in values.items():
            self._board.add_scalar(tag, value, step)
        self._board.flush()
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({"step": step, **values})

    def run_config(self, step: int, config: TrainConfig) -> None:
        """The resolved config, once per run: every `section.key` in the HPARAMS tab and the YAML in the TEXT tab.
        Only the hparams session-start record is written: from it TensorBoard infers the columns across all runs
        under its logdir and takes the metrics from each run's own scalars, while an experiment record (which
        add_hparams also writes, into a second event folder) would fix the columns to one run's keys."""
        if not self.enabled:
            return
        from tensorboardX.summary import hparams

        values = {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
                  for key, _, value in keys(config)}
        _, session_start, _ = hparams(values, {})
        self._board.file_writer.add_summary(session_start, step)
        self._board.add_text("config", f"```yaml\n{yaml.safe_dump(config.to_dict(), sort_keys=False)}```", step)
        self._board.flush()
        if self._wandb is not None:
            self._wandb.config.update(config.to_dict(), allow_val_change=True)

    def answers(self, step: int, name: str, rows: list[tuple[str, str, str]]) -> None:
        """Sample answers of validation set `name` as a markdown table (TEXT tab, `valid/<name>/answers`)."""
        if not self.enabled or not rows:
            return
        table = ["| prompt | reference | answer |", "|---|---|---|"]
        table += [f"| {' | '.join(markdown_cell(text) for text in row)} |" for row in rows]
        self._board.add_text(f"valid/{name}/answers", "\n".join(table), step)
        self._board.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({"step": step, f"valid/{name}/answers": wandb.Table(
                columns=["prompt", "reference", "answer"], data=[list(row) for row in rows])})

    def close(self) -> None:
        if self.enabled:
            self._board.close()
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(project: str, out_dir: Path):
    """A Weights & Biases run named after `out_dir`; rerunning the command continues the same run (its id is kept
    in `out_dir/wandb_run_id`)."""
    import wandb  # the wandb extra; run.wandb_project is refused when the config is read if it is missing

    id_file = out_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
    id_file.write_text(run_id)
    try:
        run = wandb.init(project=project, id=run_id, resume="allow", name=out_dir.name, dir=str(out_dir))
    except wandb.errors.Error as err:
        raise ConfigError(f"Weights & Biases project {project!r}: {str(err).splitlines()[0]}; run `wandb login`, set "
                          "WANDB_MODE=offline, or leave run.wandb_project empty") from None
    # W&B's own step may only grow, and a resumed run logs the steps after its checkpoint again: the training step
    # is the x axis instead.
    run.define_metric("*", step_metric="step")
    return run


def markdown_cell(text: str) -> str:
    """Text shown verbatim in a markdown table cell: one line, `|` and markdown's inline marks escaped, `<` `>` `&`
    as entities (TensorBoard's sanitizer would drop what looks like a tag)."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text) or " "


class Progress:
    """Training progress on the console, from the main process: a tqdm bar when stderr is a terminal; otherwise
    (pod logs, `| tee`) one plain log line per logged step, where a bar's carriage-return frames would fill the
    log."""

    def __init__(self, enabled: bool, total: int, initial: int, stream=None):
        stream = sys.stderr if stream is None else stream
        self.enabled, self.total, self.bar = enabled, total, None
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=stream)

    def update(self, step: int, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                                 tok_s=f"{metrics['tokens_per_s']:.0f}")
        elif self.enabled:
            log.info("%s", progress_line(step, self.total, metrics))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_line(step: int, total: int, metrics: dict) -> str:
    """`step 20/1000: loss 2.3456, grad_norm 0.812, lr 1.00e-04, 5120 tokens/s, 0.210 s/step, MFU 31.2%, eta 3m30s`
    (MFU when known, skipped files when there are any)."""
    parts = [f"loss {metrics['loss']:.4f}", f"grad_norm {metrics['grad_norm']:.3g}",
             f"lr {metrics['learning_rate']:.2e}", f"{metrics['tokens_per_s']:.0f} tokens/s",
             f"{metrics['step_time']:.3f} s/step"]
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if metrics.get("skipped_files"):
        parts.append(f"{metrics['skipped_files']} audio files skipped")
    parts.append(f"eta {_duration((total - step) * metrics['step_time'])}")
    return f"step {step}/{total}: " + ", ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"

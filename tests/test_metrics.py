"""Training metrics as people read them: TensorBoard's own reader on the event files (scalars, the config in the
HPARAMS and TEXT tabs, sample answers), the console of a run whose stderr is not a terminal, `--print-config`, and
the train CLI's exit codes."""

import dataclasses
import io
import json
import logging
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from af2_jax.cli.train import main
from af2_jax.config import parse_yaml
from af2_jax.training.config import ConfigError, TrainConfig, _build, check, keys
from af2_jax.training.metrics import MetricsWriter, Progress
from tests.helpers import read_events, tiny_train_config


@pytest.fixture
def config() -> TrainConfig:
    return _build(TrainConfig, tiny_train_config(Path("/data"), Path("/out")), "")


@pytest.mark.filterwarnings("ignore:html5lib's sanitizer is deprecated:DeprecationWarning")
def test_tensorboard_shows_scalars_the_config_and_sample_answers(tmp_path, config):
    from tensorboard.plugin_util import markdown_to_safe_html  # the TEXT tab's renderer

    writer = MetricsWriter(tmp_path)
    writer.run_config(0, config)
    writer.scalars(1, {"loss": 2.5, "grad_norm": 0.75})
    writer.scalars(2, {"loss": 2.25, "grad_norm": 0.5, "valid/Tones-PitchQA/test/loss": 2.0})
    rows = [("Is the tone low | high?", "Low", "<b>low</b> *a_b*"), ("Is it [x]?", "High", "")]
    writer.answers(2, "Tones-PitchQA/test", rows)
    writer.close()

    shown = read_events(tmp_path / "tensorboard")
    assert shown["scalars"] == {"loss": [(1, 2.5), (2, 2.25)], "grad_norm": [(1, 0.75), (2, 0.5)],
                                "valid/Tones-PitchQA/test/loss": [(2, 2.0)]}
    assert shown["hparams"].keys() == {key for key, _, _ in keys(config)}
    assert shown["hparams"]["optim.learning_rate"] == 1e-3 and shown["hparams"]["model.compute_dtype"] == "float32"
    assert shown["hparams"]["run.save_final"] is True
    assert json.loads(shown["hparams"]["model.overrides"]) == json.loads(json.dumps(config.model.overrides))
    [(step, text)] = shown["texts"]["config"]
    assert step == 0 and text.startswith("```yaml\n") and text.endswith("```")
    assert _build(TrainConfig, parse_yaml(text.removeprefix("```yaml\n").removesuffix("```")), "") == config
    [(step, table)] = shown["texts"]["valid/Tones-PitchQA/test/answers"]
    html = markdown_to_safe_html(table)
    cells = re.findall(r"<td>(.*?)</td>", html)
    assert step == 2 and cells == ["Is the tone low | high?", "Low", "&lt;b&gt;low&lt;/b&gt; *a_b*",
                                   "Is it [x]?", "High", ""]
    assert [json.loads(line) for line in (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 2.5, "grad_norm": 0.75},
        {"step": 2, "loss": 2.25, "grad_norm": 0.5, "valid/Tones-PitchQA/test/loss": 2.0}]


def test_only_the_main_process_writes(tmp_path, config):
    writer = MetricsWriter(tmp_path / "out", enabled=False)
    writer.run_config(0, config)
    writer.scalars(1, {"loss": 1.0})
    writer.answers(1, "A/test", [("p", "r", "a")])
    writer.close()
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_replaces_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path):
    interrupted = MetricsWriter(tmp_path)
    for step in range(1, 5):
        interrupted.scalars(step, {"loss": float(step)})
    interrupted.close()  # killed after step 4, the last checkpoint at step 2
    resumed = MetricsWriter(tmp_path, resumed_at=2)  # at once: in the same second as the first writer
    for step in range(3, 5):
        resumed.scalars(step, {"loss": 10.0 + step})
    resumed.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert read_events(tmp_path / "tensorboard")["scalars"]["loss"] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


METRICS = {"loss": 1.23456, "grad_norm": 0.5, "learning_rate": 1e-4, "tokens_per_s": 2000.4, "step_time": 0.25,
           "skipped_files": 0, "mfu": 0.125}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_progress_is_one_plain_log_line_per_logged_step(caplog):
    caplog.set_level(logging.INFO)
    stream = io.StringIO()
    progress = Progress(True, 100, 0, stream=stream)
    progress.update(10, METRICS)
    progress.update(20, {**METRICS, "skipped_files": 3})
    progress.close()
    assert stream.getvalue() == ""  # no bar frames
    assert [r.getMessage() for r in caplog.records] == [
        "step 10/100: loss 1.2346, grad_norm 0.5, lr 1.00e-04, 2000 tokens/s, 0.250 s/step, MFU 12.5%, eta 0m22s",
        "step 20/100: loss 1.2346, grad_norm 0.5, lr 1.00e-04, 2000 tokens/s, 0.250 s/step, MFU 12.5%, "
        "3 audio files skipped, eta 0m20s"]


def test_on_a_terminal_progress_is_a_bar_and_no_log_lines(caplog):
    caplog.set_level(logging.INFO)
    terminal = _Terminal()
    progress = Progress(True, 100, 0, stream=terminal)
    progress.update(10, METRICS)
    progress.close()
    assert "\r" in terminal.getvalue() and "10/100" in terminal.getvalue() and "loss=1.2346" in terminal.getvalue()
    assert caplog.records == []
    other_terminal = _Terminal()
    other_process = Progress(False, 100, 0, stream=other_terminal)  # not process 0: silent
    other_process.update(10, METRICS)
    assert other_terminal.getvalue() == "" and caplog.records == []


def _printed_keys(printed: str) -> dict:
    """`section.key=value  # doc` lines -> {section.key: (value, doc)}."""
    out = {}
    for line in printed.splitlines():
        if line.startswith("  "):
            setting, _, doc = line.strip().partition("  # ")
            key, _, value = setting.strip().partition("=")
            out[key] = (value, doc)
    return out


def test_print_config_lists_every_key_with_its_default_and_documentation(capsys, cli_logging):
    assert main(["--print-config"]) == 0
    printed = capsys.readouterr().out
    shown = _printed_keys(printed)
    defaults = TrainConfig()
    assert list(shown) == [key for key, _, _ in keys(defaults)]  # every key of every section, in order
    for key, field, default in keys(defaults):
        value, doc = shown[key]
        assert parse_yaml(value) == default, key
        assert doc.strip() and not doc.startswith("["), f"{key} has no documentation (use _key/_within/_one_of)"
    for section in dataclasses.fields(defaults):
        assert f"\n{section.name}: " in f"\n{printed}"


def test_print_config_with_a_config_shows_the_resolved_values(tmp_path, capsys, cli_logging):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(tmp_path, tmp_path / "out")))
    assert main(["--print-config", "--config", str(path), "run.steps=7"]) == 0
    shown = _printed_keys(capsys.readouterr().out)
    assert shown["run.steps"][0] == "7" and shown["optim.trainable"][0] == "full"
    assert not (tmp_path / "out").exists()


def test_train_exit_codes_bad_argument_2_unusable_input_1(tmp_path, capsys, cli_logging):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "c.yaml", "--num-processes", "two"])
    assert exit_.value.code == 2
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {tmp_path / 'missing.yaml'}: no such config file; "
                                                        "pass one of train/configs/*.yaml")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(tmp_path, tmp_path / "out")))
    assert main(["--config", str(path), "optim.learnin_rate=1"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown config key 'optim.learnin_rate'")


class _FakeWandb(types.ModuleType):
    """The part of the wandb API the writer uses, recording each call (no account, no network)."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        self.errors = types.SimpleNamespace(Error=RuntimeError)
        self.config = types.SimpleNamespace(update=lambda values, **kw: self.calls.append(("config", values)))

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, values):
        self.calls.append(("log", values))

    def Table(self, columns, data):
        return ("table", columns, data)

    def finish(self):
        self.calls.append(("finish",))


def test_weights_and_biases_gets_the_metrics_the_config_and_the_answers_and_a_rerun_continues_its_run(
        tmp_path, config, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    writer = MetricsWriter(tmp_path, wandb_project="af2")
    writer.run_config(0, config)
    writer.scalars(1, {"loss": 2.5})
    writer.answers(1, "A/test", [("p", "r", "a")])
    writer.close()
    MetricsWriter(tmp_path, resumed_at=1, wandb_project="af2").close()
    (_, first), define, configured, scalars, answers, finish, (_, again), *_ = fake.calls
    assert first == {"project": "af2", "id": first["id"], "resume": "allow", "name": tmp_path.name,
                     "dir": str(tmp_path)} and again["id"] == first["id"]
    assert define == ("define_metric", "*", "step")  # the training step is the x axis, resumed steps included
    assert configured == ("config", config.to_dict())
    assert scalars == ("log", {"step": 1, "loss": 2.5})
    assert answers == ("log", {"step": 1, "valid/A/test/answers": ("table", ["prompt", "reference", "answer"],
                                                                   [["p", "r", "a"]])})
    assert finish == ("finish",)


def test_a_wandb_project_without_wandb_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    raw = tiny_train_config(tmp_path, tmp_path / "out", run={"wandb_project": "af2"})
    with pytest.raises(ConfigError, match=r"^run.wandb_project is 'af2' but wandb is not installed; pip install"):
        check(_build(TrainConfig, raw, ""))

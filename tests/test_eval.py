"""`python -m af2_jax.eval`: on the demo set its values equal a plain loop of `af2_jax.answer` + exact match, and
`eval score` recomputes them from the predictions; a killed run resumes and scores every item once; bad configs,
missing folders, items without a reference and undecodable audio each get one line and the documented exit code;
the config, the prompt templates, caption merging and the MMAU manifest recipe."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from af2_jax.checkpoint.resolve import DEMO_CHECKPOINT
from af2_jax.cli.common import EXIT_ARGUMENTS, EXIT_INPUT, EXIT_INTERRUPTED
from af2_jax.cli.eval import main as eval_cli
from af2_jax.evaluation import Benchmark, EvalConfigError, load_eval_config
from af2_jax.evaluation.data import BenchmarkDataError, benchmark_items
from af2_jax.evaluation.runner import EvalOutput
from af2_jax.metrics import exact_match
from tests.helpers import REPO, write_demo_held_out

DEMO_CONFIG = REPO / "eval" / "demo.yaml"


def _run(folder, out, *more):
    return eval_cli(["--config", str(DEMO_CONFIG), "--data-root", str(folder), "--checkpoint", str(DEMO_CHECKPOINT),
                     "--output", str(out), *more])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_equals_a_plain_loop_of_answer_and_score_agrees(demo_held_out, demo_answers_alone, tmp_path,
                                                             cli_logging):
    folder, tasks = demo_held_out
    out = tmp_path / "out"
    assert _run(folder, out) == 0
    results = json.loads((out / "results.json").read_text())
    config = load_eval_config(DEMO_CONFIG)
    for benchmark, task in zip(config.benchmarks, tasks):
        manifest = json.loads((folder / benchmark.manifest).read_text())
        keys = list(manifest["data"])
        loop = exact_match([demo_answers_alone[task, key] for key in keys],
                           [manifest["data"][key]["output"] for key in keys])
        got = results["benchmarks"][benchmark.name]
        assert (got["value"], got["n"], got["missing"], got["metric"]) == (loop, len(keys), 0, "accuracy")
    predictions = _lines(out / "predictions.jsonl")
    assert len(predictions) == 48 and {tuple(sorted(p)) for p in predictions} == {
        ("benchmark", "id", "prediction", "prompt", "reference", "score")}
    assert results["checkpoint"] == str(DEMO_CHECKPOINT.resolve()) and results["items_per_s"] > 0
    assert results["prompt_templates"]["demo_tones"] == "{prompt}" and results["seed"] == 0
    assert (out / "report.png").stat().st_size > 0 and "| demo_tones | accuracy |" in (out / "report.md").read_text()
    assert load_eval_config(out / "config.yaml").checkpoint == str(DEMO_CHECKPOINT.resolve())

    rescored = tmp_path / "rescored"
    rescored.mkdir()
    shutil.copy(out / "predictions.jsonl", rescored)
    assert eval_cli(["score", str(rescored), "--config", str(DEMO_CONFIG)]) == 0
    again = json.loads((rescored / "results.json").read_text())
    assert again["benchmarks"] == results["benchmarks"] and again["config_hash"] != results["config_hash"]
    assert eval_cli(["score", str(out)]) == 0  # with the run's own config.yaml: the same file again
    assert json.loads((out / "results.json").read_text()) == results


def test_a_killed_run_resumes_and_scores_every_item_once(demo_held_out, tmp_path, monkeypatch, capsys, cli_logging):
    folder, _ = demo_held_out
    out = tmp_path / "out"
    write, written = EvalOutput.write, []

    def killed_after_three(self, item, **result):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(item.id)
        write(self, item, **result)

    monkeypatch.setattr(EvalOutput, "write", killed_after_three)
    assert _run(folder, out, "--benchmarks", "demo_tones,demo_beeps", "--limit", "3") == EXIT_INTERRUPTED
    monkeypatch.undo()
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"benchmark": "demo_beeps", "id": "1", "prom')  # a line the kill cut off
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3 + 1
    capsys.readouterr()
    assert _run(folder, out, "--benchmarks", "demo_tones,demo_beeps", "--limit", "3") == 0
    assert "dropping an incomplete last line" in capsys.readouterr().err
    keys = [(p["benchmark"], p["id"]) for p in _lines(out / "predictions.jsonl")]
    assert sorted(keys) == sorted((b, str(i)) for b in ("demo_tones", "demo_beeps") for i in range(3))
    results = json.loads((out / "results.json").read_text())["benchmarks"]
    assert results["demo_tones"]["n"] == results["demo_beeps"]["n"] == 3

    # The same folder with another prompt for a benchmark it holds is refused, and left as it was.
    other = tmp_path / "other.yaml"
    other.write_text(DEMO_CONFIG.read_text().replace("metric: accuracy}", 'metric: accuracy, prompt: "{prompt}?"}'))
    before = (out / "predictions.jsonl").read_bytes()
    assert eval_cli(["--config", str(other), "--data-root", str(folder), "--checkpoint", str(DEMO_CHECKPOINT),
                     "--output", str(out), "--benchmarks", "demo_tones"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "another manifest, metric, prompt or decoding" in err and err.count("error: ") == 1
    assert (out / "predictions.jsonl").read_bytes() == before
    # ... and so is the same config with int8 weights: one folder never mixes predictions of two models.
    assert _run(folder, out, "--benchmarks", "demo_tones", "--quantize", "int8") == EXIT_INPUT
    assert "quantize None, max_windows None, not checkpoint" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_bytes() == before


def _manifest(path: Path, data: dict, split_path: str = "audio") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"split": "test", "split_path": split_path, "flamingo_task": "x",
                                "total_num": len(data), "data": data}))


def test_bad_data_is_one_line_each_and_the_run_goes_on(demo_held_out, tmp_path, capsys, cli_logging):
    """A missing benchmark folder and an item without a reference skip their benchmark (exit 1, the rest runs);
    undecodable audio is counted as missing, never scored wrong; a judge benchmark is skipped with its reason."""
    folder, _ = demo_held_out
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    tones = json.loads((data / "manifests/DemoTones-PitchQA/test.json").read_text())
    broken = data / tones["split_path"] / tones["data"]["1"]["name"]
    broken.write_bytes(b"not audio at all")
    no_reference = {"0": {"name": tones["data"]["0"]["name"], "prompt": "what?"}}
    _manifest(data / "NoReference/test.json", no_reference, tones["split_path"])
    config = tmp_path / "bad.yaml"
    config.write_text("benchmarks:\n"
                      "  - {name: tones, manifest: manifests/DemoTones-PitchQA/test.json, metric: accuracy}\n"
                      "  - {name: gone, manifest: Nowhere-AQA/test.json, metric: accuracy}\n"
                      "  - {name: unreferenced, manifest: NoReference/test.json, metric: accuracy}\n"
                      "  - {name: judged, manifest: Nowhere-AQA/test.json, metric: judge, reported: 0.9}\n")
    out = tmp_path / "out"
    capsys.readouterr()
    assert eval_cli(["--config", str(config), "--data-root", str(data), "--checkpoint", str(DEMO_CHECKPOINT),
                     "--output", str(out), "--limit", "3"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.count("benchmark gone: its folder") == 1 and "Nowhere-AQA" in err
    assert err.count('benchmark unreferenced: item 0 has no reference ("output")') == 1
    assert err.count("benchmark judged skipped: scored by an LLM judge") == 1
    assert err.count(f"tones 1: {broken}") == 1  # the undecodable file, named once
    results = json.loads((out / "results.json").read_text())["benchmarks"]
    assert (results["tones"]["n"], results["tones"]["missing"]) == (2, 1)
    missing, = results["tones"]["missing_items"]
    assert missing["id"] == "1" and str(broken) in missing["why"]
    assert results["gone"]["value"] is None and "does not exist" in results["gone"]["skipped"]
    assert results["judged"]["skipped"].startswith("scored by an LLM judge") and results["judged"]["reported"] == 0.9
    report = (out / "report.md").read_text()
    assert "## Skipped" in report and "- tones, id 1:" in report


@pytest.mark.parametrize("text, message", [
    ("benchmarks:\n  - {name: a, manifest: A/test.json, metric: bleu}\n", "unknown metric 'bleu'; metrics: accuracy"),
    ("benchmarks:\n  - {name: a, manifest: A/test.json, metric: accuracy, promt: x}\n",
     "unknown key 'benchmarks[0].promt'; valid keys here: name, manifest, metric, prompt, decoding"),
    ("benchmark: []\n", "unknown key 'benchmark'; valid keys here: benchmarks, seed"),
    ("benchmarks:\n  - {name: a, manifest: A/test.json, metric: accuracy, decoding: {temperature: -1}}\n",
     "benchmarks[0] (a): decoding: temperature must be a finite number >= 0"),
    ("benchmarks:\n  - {name: a, manifest: A/test.json, metric: accuracy, reported: high}\n",
     "benchmarks[0].reported must be a number or null"),
    ("benchmarks:\n  - {name: a, manifest: A/test.json, metric: accuracy}\n"
     "  - {name: a, manifest: B/test.json, metric: accuracy}\n", "the name 'a' is used twice"),
    ("benchmarks:\n  - {name: a, manifest: A/test.json, metric: accuracy, prompt: '{question'}\n",
     "prompt is not a valid template"),
    ("benchmarks:\n  - {name: a, manifest: A/test.json, metric: accuracy, prompt: 'say {0}'}\n",
     "prompt names fields by position"),
])
def test_config_errors_are_one_line_and_exit_1_before_loading(text, message, tmp_path, capsys, cli_logging):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert eval_cli(["--config", str(config), "--data-root", str(tmp_path), "--output", str(tmp_path / "out")]) \
        == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_command_line_mistakes(tmp_path, capsys, cli_logging):
    with pytest.raises(SystemExit) as done:
        eval_cli(["--config", str(DEMO_CONFIG), "--output", str(tmp_path), "--judge-url", "http://localhost:1"])
    assert done.value.code == EXIT_ARGUMENTS and "not implemented yet" in capsys.readouterr().err
    assert eval_cli(["--config", str(DEMO_CONFIG), "--data-root", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--benchmarks", "demo_tones,mmau"]) == EXIT_INPUT
    assert "'mmau' is not a benchmark of the config; it has: demo_tones, demo_beeps" in capsys.readouterr().err
    assert eval_cli(["score", str(tmp_path)]) == EXIT_INPUT
    assert "has no config.yaml; pass --config FILE" in capsys.readouterr().err
    (tmp_path / "predictions.jsonl").write_text('{"benchmark": "demo_tones", "id": 0, "prediction": "low"}\n')
    assert eval_cli(["score", str(tmp_path), "--config", str(DEMO_CONFIG)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert 'predictions.jsonl:1: a predictions line needs "benchmark" (a string), "id", "reference"' in err


def test_presets_parse_and_name_the_model_card():
    config = load_eval_config(REPO / "eval" / "af2.yaml")
    reported = {b.name: b.reported for b in config.benchmarks}
    assert reported["mmau_sound"] == 0.651 and reported["mmau_music"] == 0.729 and reported["muchomusic"] == 0.565
    assert {b.name for b in config.benchmarks if b.metric == "judge"} == {
        "compa_r_test", "openaqa", "musicinstruct_long", "musicqa", "longaudiobench"}
    assert reported["clotho_captioning"] is None and config.benchmarks[0].decoding.max_new_tokens == 256


def test_templates_options_and_caption_merging(tmp_path):
    _manifest(tmp_path / "Set/test.json", {
        "0": {"name": "a.wav", "prompt": "Describe.", "output": "a dog barks", "question": "What?",
              "choices": ["a dog", "a cat"], "task": "sound"},
        "1": {"name": "b.wav", "prompt": "Describe.", "output": "rain", "question": "Which?", "choices": ["x", "y"],
              "task": "music"},
        "2": {"name": "a.wav", "prompt": "Describe.", "output": "a dog is barking", "question": "What?",
              "choices": ["a dog", "a cat"], "task": "sound"}})
    mmau = Benchmark("m", "Set/test.json", "mmau_choice", "{question} Choose:\n{options}", group_by="task")
    items = benchmark_items(mmau, tmp_path, captions=False)
    assert items[0].prompt == "What? Choose:\n(A) a dog\n(B) a cat" and items[1].group == "music"
    assert items[0].audio == str(tmp_path / "audio" / "a.wav") and items[0].choices == ("a dog", "a cat")
    merged = benchmark_items(Benchmark("c", "Set/test.json", "cider_d"), tmp_path, captions=True)
    assert [(it.id, it.reference) for it in merged] == [("0", ("a dog barks", "a dog is barking")), ("1", ("rain",))]
    with pytest.raises(BenchmarkDataError, match=r"benchmark t: the prompt template names \{speaker\}, which item 0"):
        benchmark_items(Benchmark("t", "Set/test.json", "accuracy", "{speaker}"), tmp_path, captions=False)


def test_mmau_manifest_recipe_gives_the_preset_prompt(tmp_path):
    spec = importlib.util.spec_from_file_location("make_mmau", REPO / "eval" / "make_mmau_manifests.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    (tmp_path / "MMAU").mkdir()
    (tmp_path / "MMAU" / "mmau-test-mini.json").write_text(json.dumps([
        {"id": "q1", "audio_id": "./test-mini-audios/q1.wav", "question": "What is heard?",
         "choices": ["Man", "Woman"], "answer": "Man", "task": "sound", "category": "Reasoning"},
        {"id": "q2", "audio_id": "./test-mini-audios/q2.wav", "question": "Which instrument?",
         "choices": ["Piano", "Drums", "Violin"], "answer": "Drums", "task": "music", "category": "Perception"}]))
    assert recipe.main([str(tmp_path / "MMAU" / "mmau-test-mini.json"), "--data-root", str(tmp_path)]) == 0
    preset = {b.name: b for b in load_eval_config(REPO / "eval" / "af2.yaml").benchmarks}
    item, = benchmark_items(preset["mmau_music"], tmp_path, captions=False)
    assert item.prompt == json.loads((tmp_path / "MMAU-Music" / "test.json").read_text())["data"]["0"]["prompt"]
    assert item.audio == str(tmp_path / "MMAU" / "test-mini-audios" / "q2.wav") and item.reference == "Drums"


def test_config_round_trips_through_the_folder_file(tmp_path):
    config = load_eval_config(REPO / "eval" / "af2.yaml")
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    assert load_eval_config(tmp_path / "c.yaml") == config
    with pytest.raises(EvalConfigError, match="no such config file"):
        load_eval_config(tmp_path / "missing.yaml")
    assert config.select(["mmau_sound"]).digest() != config.digest()


def _recorded_demo_exact_match() -> dict[str, float]:
    """Held-out exact match per task as bench/RESULTS.md records it for the demo model (its table rows
    `| Demo...-...QA | 93.3% | ... |`)."""
    rows = re.findall(r"^\| (Demo\w+-\w+) \| ([0-9.]+)% \|", (REPO / "bench" / "RESULTS.md").read_text(), re.M)
    return {task: float(percent) / 100 for task, percent in rows}


@pytest.mark.slow
def test_eval_on_every_held_out_item_matches_the_recorded_results(tmp_path, cli_logging):
    """All 60 held-out items per task: eval's values are within one item per task of the exact match training's own
    evaluation recorded in bench/RESULTS.md."""
    per_task = 60
    tasks = write_demo_held_out(tmp_path / "data", per_task)
    assert _run(tmp_path / "data", tmp_path / "out") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]
    recorded = _recorded_demo_exact_match()
    assert set(recorded) == set(tasks)
    for benchmark, task in zip(load_eval_config(DEMO_CONFIG).benchmarks, tasks):
        got = results[benchmark.name]
        assert got["n"] == per_task and abs(got["value"] - recorded[task]) * per_task <= 1 + 1e-9, (task, got)


def test_score_keeps_the_last_line_of_an_item_and_needs_mmau_options(tmp_path, cli_logging, capsys):
    """Predictions from elsewhere: a retried item's later line wins over its earlier "missing" one, a last line cut
    off is left out, and mmau_choice without options is one error line."""
    config = tmp_path / "c.yaml"
    config.write_text("benchmarks:\n  - {name: q, manifest: Q/test.json, metric: accuracy}\n"
                      "  - {name: m, manifest: M/test.json, metric: mmau_choice}\n")
    lines = [{"benchmark": "q", "id": 1, "reference": "low", "missing": "no such file"},
             {"benchmark": "q", "id": 1, "reference": "low", "prediction": "Low."},
             {"benchmark": "q", "id": 2, "reference": "high", "prediction": "low"},
             {"benchmark": "m", "id": 1, "reference": "a dog", "prediction": "(A) a dog",
              "prompt": "What? (A) a dog (B) a cat\nAnswer with the option."}]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"benchmark": "q", "i')
    assert eval_cli(["score", str(tmp_path), "--config", str(config)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["benchmarks"]
    assert (results["q"]["value"], results["q"]["n"], results["q"]["missing"]) == (0.5, 2, 0)
    assert results["m"]["value"] == 1.0 and "incomplete last line" in capsys.readouterr().err
    lines[3]["prompt"] = "What is it?"
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert eval_cli(["score", str(tmp_path), "--config", str(config)]) == EXIT_INPUT
    assert "mmau_choice needs each item's options" in capsys.readouterr().err


def test_an_options_template_needs_choices(tmp_path):
    _manifest(tmp_path / "Set/test.json", {"0": {"name": "a.wav", "output": "x", "question": "What?"}})
    with pytest.raises(BenchmarkDataError, match=r"item 0 has no \"choices\", which the prompt template's \{options\}"):
        benchmark_items(Benchmark("b", "Set/test.json", "mmau_choice", "{question}\n{options}"), tmp_path,
                        captions=False)
    _manifest(tmp_path / "Set/test.json", {"0": {"name": "a.wav", "output": "x", "audio_start": None}})
    with pytest.raises(BenchmarkDataError, match="benchmark b: item 0 cannot be used"):
        benchmark_items(Benchmark("b", "Set/test.json", "accuracy", "q"), tmp_path, captions=False)

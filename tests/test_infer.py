import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import af2_jax
from af2_jax.cli.common import EXIT_CODES
from af2_jax.checkpoint.resolve import DEMO_CHECKPOINT
from af2_jax.cli.infer import main as infer_cli
from tests.helpers import REPO, pygame_clip_dir


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint):
    return small_checkpoint

@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An empty AF2_JAX_HOME: no converted release in it, and a fresh compilation cache."""
    return tmp_path_factory.mktemp("af2_home")


def _env(home):
    """The CLI's environment with `home` as AF2_JAX_HOME, whose xla/ then keeps the compiled programs (the session's
    JAX_COMPILATION_CACHE_DIR would take precedence)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "AF2_JAX_COMPILATION_CACHE")}
    return dict(env, PYTHONPATH=str(REPO), AF2_JAX_HOME=str(home))


def _cli(home, *args, **kw):
    return subprocess.run([sys.executable, "-m", "af2_jax.infer", *map(str, args)], capture_output=True, text=True,
                          env=_env(home), **kw)


def test_answer_one_liner(checkpoint, audio_files):
    model = af2_jax.load(checkpoint, dtype="float32")
    tok = af2_jax.load_tokenizer(checkpoint)
    text = af2_jax.answer(model, tok, audio_files["speech"], "What is said?", max_new_tokens=6)
    windows = af2_jax.audio.load_windows(audio_files["speech"])
    assert af2_jax.answer(model, tok, windows, "what is said?", max_new_tokens=6) == text
    ids = tok.prompt_ids("What is said?")  # the same as generate + answer extraction by hand
    out = af2_jax.generate(model, np.asarray([ids]), np.ones((1, len(ids)), np.int32), windows[0][None],
                           windows[1][None], max_new_tokens=6)
    assert text == tok.answer(ids, out.tokens[0, : out.lengths[0]])


def test_cli_answers_real_audio(checkpoint, audio_files, home):
    clip = pygame_clip_dir() / "house_lo.ogg"
    run = _cli(home, "--checkpoint", checkpoint, "--audio", audio_files["speech"], clip, "--prompt", "What is this?",
               "--max-new-tokens", 6, "--dtype", "float32", "--json")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["audio"] for line in lines] == [str(audio_files["speech"]), str(clip)]
    model = af2_jax.load(checkpoint, dtype="float32")  # the CLI's batch answers each clip as alone
    tok = af2_jax.load_tokenizer(checkpoint)
    assert [line["answer"] for line in lines] == [
        af2_jax.answer(model, tok, path, "What is this?", max_new_tokens=6) for path in (audio_files["speech"], clip)]
    assert "checkpoint:" in run.stderr and "dtype float32" in run.stderr and "device cpu" in run.stderr
    assert "compile" in run.stderr and "audio encoding" in run.stderr and "decoding" in run.stderr
    assert any((home / "xla").iterdir())  # compiled programs kept for the next run


def test_manifest_resumes_after_a_kill(checkpoint, audio_files, tmp_path, home):
    clips = [audio_files["speech"], audio_files["long25"], pygame_clip_dir() / "boom.wav",
             pygame_clip_dir() / "punch.wav", audio_files["stereo"], tmp_path / "missing.wav"]
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"q{n}", "audio": str(c), "prompt": f"question {n}?"}) + "\n"
                                for n, c in enumerate(clips)))
    output = tmp_path / "out.jsonl"
    args = ["--checkpoint", checkpoint, "--manifest", manifest, "--output", output, "--batch-size", 1,
            "--max-new-tokens", 4, "--dtype", "float32", "--keep-going"]
    proc = subprocess.Popen([sys.executable, "-m", "af2_jax.infer", *map(str, args)], env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (output.exists() and output.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(output, "a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"id": "q5", "aud')
    first = [json.loads(line)["id"] for line in output.read_text().splitlines()[:-1]]
    assert len(first) >= 2
    run = _cli(home, *args)
    assert run.returncode == 0, run.stderr
    assert f"{len(first)} already answered" in run.stderr and "incomplete last line" in run.stderr
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == [f"q{n}" for n in range(6)]
    errors = [line for line in lines if "error" in line]
    assert [e["id"] for e in errors] == ["q5"] and "no such file" in errors[0]["error"]
    assert all("answer" in line for line in lines if "error" not in line)


@pytest.mark.parametrize("args, message", [
    (["--audio", "{missing}", "--prompt", "hi"], "no such file"),
    (["--audio", "{text}", "--prompt", "hi"], "cannot be decoded as audio"),
    (["--audio", "{speech}", "--prompt", "   "], "the prompt is empty"),
    (["--checkpoint", "{tmp}", "--audio", "{speech}", "--prompt", "hi"], "no config.json"),
    (["--audio", "{speech}", "--prompt", "hi", "--mesh", "data=2,tensor=4"], "needs 8 devices but 1 are available"),
])
def test_bad_input_is_one_line(checkpoint, audio_files, tmp_path, capsys, args, message):
    text = tmp_path / "notes.wav"
    text.write_text("not audio " * 100)
    subs = {"{missing}": str(tmp_path / "nope.wav"), "{text}": str(text), "{speech}": str(audio_files["speech"]),
            "{tmp}": str(tmp_path)}
    args = [subs.get(a, a) for a in args]
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(checkpoint)] + args
    assert infer_cli(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.mark.parametrize("args", [
    ["--audio", "a.wav"],  # no prompt
    ["--audio", "a.wav", "--prompt", "x", "--manifest", "m.jsonl", "--output", "o.jsonl"],
    ["--manifest", "m.jsonl"],
    ["--audio", "a.wav", "--prompt", "x", "--stream", "--json"],
    ["--audio", "a.wav", "--prompt", "x", "--max-windows", "31"],
])
def test_conflicting_flags_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer_cli(args)
    assert exit_info.value.code == 2


def test_no_checkpoint_says_what_to_pass(audio_files, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AF2_JAX_HOME", str(tmp_path / "cache"))
    import af2_jax.checkpoint.resolve as resolve_module

    monkeypatch.setattr(resolve_module, "DEMO_CHECKPOINT", tmp_path / "no-demo")
    assert infer_cli(["--audio", str(audio_files["speech"]), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint: pass --checkpoint DIR" in err and "--download" in err


def test_stream_prints_the_same_answer(checkpoint, audio_files, capsys):
    common = ["--checkpoint", str(checkpoint), "--audio", str(audio_files["speech"]), "--prompt", "what?",
              "--max-new-tokens", "6", "--dtype", "float32"]
    assert infer_cli(common) == 0
    plain = capsys.readouterr().out.strip()
    assert infer_cli(common + ["--stream"]) == 0
    streamed = capsys.readouterr().out.strip()
    assert streamed == f"{audio_files['speech']}: {plain}".strip()


def _make_demo_command() -> list[str]:
    """The command `make demo` runs, read from the Makefile, with this interpreter for $(PY)."""
    makefile = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) :?= (.*)$", makefile, re.M))
    recipe = re.search(r"^demo:.*\n\t(.*)$", makefile, re.M).group(1)
    expanded = re.sub(r"\$\((\w+)\)", lambda m: sys.executable if m[1] == "PY" else variables[m[1]], recipe)
    return shlex.split(expanded)


def test_make_demo_answers_three_without_surprises(tmp_path):
    """The first run of `make demo`, on an empty AF2_JAX_HOME: the answer, no warning, one line about the
    checkpoint, and a line before compiling that says where the programs are kept (and they are)."""
    run = subprocess.run(_make_demo_command(), cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=_env(tmp_path))
    assert run.returncode == 0, run.stderr
    assert run.stdout == "three\n"
    assert "warning" not in run.stderr.lower(), run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 4, run.stderr
    assert lines[0].startswith("audio: 1 file(s), 1 window(s) loaded in ")
    assert lines[1].startswith(f"checkpoint: {DEMO_CHECKPOINT} (the embedded DEMO model") and "loaded in" in lines[1]
    assert lines[2] == ("compiling for 1 row(s) x 1 window(s), prompt 16 + 256 new tokens (first run only; cached in "
                        f"{tmp_path / 'xla'})")
    assert lines[3].startswith("compile ") and "decoding" in lines[3]
    assert any((tmp_path / "xla").iterdir())


def test_help_shows_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer_cli(["--help"])
    assert exit_info.value.code == 0
    assert EXIT_CODES in capsys.readouterr().out


def test_ctrl_c_exits_130(audio_files, capsys, monkeypatch):
    import af2_jax.checkpoint.resolve as resolve_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(resolve_module, "resolve_checkpoint", interrupted)
    assert infer_cli(["--audio", str(audio_files["speech"]), "--prompt", "hi"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_compilation_cache_goes_where_the_user_says(tmp_path, monkeypatch):
    """af2_jax.load turns the cache on in $AF2_JAX_HOME/xla; a folder the user chose stays, and
    AF2_JAX_COMPILATION_CACHE=0 leaves the cache off."""
    import jax

    from af2_jax.cache import use_compilation_cache

    chosen = jax.config.jax_compilation_cache_dir  # the session's, from JAX_COMPILATION_CACHE_DIR (conftest)
    monkeypatch.setenv("AF2_JAX_HOME", str(tmp_path))
    try:
        assert use_compilation_cache() == chosen and jax.config.jax_compilation_cache_dir == chosen
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("AF2_JAX_COMPILATION_CACHE", "0")
        assert use_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.delenv("AF2_JAX_COMPILATION_CACHE")
        assert use_compilation_cache() == str(tmp_path / "xla") == jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", chosen)

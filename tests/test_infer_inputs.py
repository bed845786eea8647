"""`python -m af2_jax.infer` on inputs that cannot be used as given: each is refused with one line before the model
is loaded (so nothing here compiles, except the one demo-model run), or becomes that item's "error" line."""

import json
import sys

import numpy as np
import pytest
import soundfile

from af2_jax.cli.infer import main as infer_cli

LONG_PROMPT = "word " * 600  # about 600 tokens, over the 512 a prompt may have


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tone.wav"
    soundfile.write(str(path), 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000), 16000)
    return str(path)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def manifest_run(clip, tmp_path_factory):
    """One run of the embedded demo model over a manifest with a too-long prompt and fields of the wrong type."""
    folder = tmp_path_factory.mktemp("manifest")
    lines = [{"id": "long", "audio": clip, "prompt": LONG_PROMPT}, {"id": "p7", "audio": clip, "prompt": 7},
             {"id": "a3", "audio": 3, "prompt": "hi"}, {"id": "anull", "audio": None, "prompt": "hi"},
             {"id": "plist", "audio": clip, "prompt": ["a"]}, {"id": {"x": 1}, "audio": clip, "prompt": "hi"}]
    manifest, output = folder / "in.jsonl", folder / "out.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = infer_cli(["--manifest", str(manifest), "--output", str(output), "--max-new-tokens", "2",
                      "--dtype", "float32", "--keep-going"])
    return code, {line["id"]: line for line in map(json.loads, output.read_text().splitlines())}


def test_fields_of_the_wrong_type_become_error_lines(manifest_run):
    code, lines = manifest_run
    assert code == 0
    assert sorted(lines) == ["6", "a3", "anull", "long", "p7", "plist"]  # a bad "id" is kept under its line number
    assert "answer" in lines["long"]
    for key, field in (("p7", '"prompt"'), ("a3", '"audio"'), ("anull", '"audio"'), ("plist", '"prompt"'),
                       ("6", '"id"')):
        assert field in lines[key]["error"] and "answer" not in lines[key], lines[key]


def test_a_long_prompt_is_not_answered_with_the_prompt(manifest_run):
    _, lines = manifest_run
    assert "word word" not in lines["long"]["answer"] and lines["long"]["prompt"] == LONG_PROMPT


def _manifest(folder, *lines):
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("content", [
    b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\n\x80>\x00\x00\x00}\x00\x00\x02\x00\x10\x00data",
    b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80>\x00",  # no newline at all
    b"meeting notes\n- ask about the dog barking\n- unfinished thought",
    b'{"id": "1", "audio": "a.wav", "prompt": "hi", "answer": "x"}\n{"note": "mine"}\n',
], ids=["wav", "wav-without-newline", "notes", "other-json"])
def test_an_output_that_is_not_an_answer_file_is_left_untouched(content, clip, tmp_path, capsys):
    manifest = _manifest(tmp_path, {"audio": clip, "prompt": "hi"})
    output = tmp_path / "precious"
    output.write_bytes(content)
    assert infer_cli(["--manifest", str(manifest), "--output", str(output)]) == 1
    err = _one_line_error(capsys)
    assert "not an answer file" in err and "another --output" in err
    assert output.read_bytes() == content


def test_an_output_with_other_questions_is_refused(clip, tmp_path, capsys):
    manifest = _manifest(tmp_path, {"audio": clip, "prompt": "what is this?"})  # id 1: its line number
    output = tmp_path / "out.jsonl"
    content = json.dumps({"id": "1", "audio": "other.wav", "prompt": "what is this?", "answer": "a dog"}) + "\n"
    output.write_text(content)
    assert infer_cli(["--manifest", str(manifest), "--output", str(output)]) == 1
    err = _one_line_error(capsys)
    assert "id 1" in err and str(output) in err and "another --output" in err and "delete" in err
    assert output.read_text() == content


@pytest.mark.parametrize("how", ["symlink", "relative"])
def test_the_manifest_as_its_own_output_is_refused(how, clip, tmp_path, capsys, monkeypatch):
    manifest = _manifest(tmp_path, {"audio": clip, "prompt": "hi"})
    content = manifest.read_bytes()
    if how == "symlink":
        output = tmp_path / "link.jsonl"
        output.symlink_to(manifest)
    else:
        monkeypatch.chdir(tmp_path)
        output = "./in.jsonl"
    assert infer_cli(["--manifest", str(manifest), "--output", str(output)]) == 1
    assert "is the manifest" in _one_line_error(capsys)
    assert manifest.read_bytes() == content


def test_a_line_that_is_not_a_json_object_stops_the_run(clip, tmp_path, capsys):
    manifest = tmp_path / "in.jsonl"
    manifest.write_text(json.dumps({"audio": clip, "prompt": "hi"}) + "\n[1, 2]\n")
    assert infer_cli(["--manifest", str(manifest), "--output", str(tmp_path / "out.jsonl")]) == 1
    assert f"{manifest}:2:" in _one_line_error(capsys)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"),
                                         ("--temperature", "-inf"), ("--top-p", "nan")])
def test_non_finite_sampling_flags_exit_2(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer_cli(["--audio", str(tmp_path / "missing.wav"), "--prompt", "hi", f"{flag}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag.lstrip("-").replace("-", "_") in err and value in err


def test_max_new_tokens_must_fit_the_context(clip, capsys):
    # The demo model has 32768 positions (as the release); a prompt may take 512 of them.
    assert infer_cli(["--audio", clip, "--prompt", "hi", "--max-new-tokens", "40000"]) == 1
    err = _one_line_error(capsys)
    assert "--max-new-tokens 40000" in err and "32768" in err and "32256 or less" in err


def test_an_m4a_without_pyav_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # as without PyAV installed: `import av` raises ImportError
    voice_note = tmp_path / "voice-note.m4a"
    voice_note.write_bytes(b"\x00\x00\x00\x1cftypM4A \x00\x00\x02\x00isomiso2" + bytes(64))
    assert infer_cli(["--audio", str(voice_note), "--prompt", "what is said?"]) == 1
    err = _one_line_error(capsys)
    assert err == (f"error: {voice_note}: is an MP4/M4A file, which libsndfile cannot decode; install PyAV to read it "
                   "(pip install -e '.[av]') or convert the file to wav/flac\n")


def test_a_second_run_on_the_same_output_is_refused(clip, tmp_path, capsys):
    import fcntl

    manifest = _manifest(tmp_path, {"audio": clip, "prompt": "hi"})
    output = tmp_path / "out.jsonl"
    with open(tmp_path / "out.jsonl.lock", "w") as held:  # what a run in progress holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert infer_cli(["--manifest", str(manifest), "--output", str(output)]) == 1
        err = _one_line_error(capsys)
        assert f"another run is writing {output}" in err and "out.jsonl.lock" in err
    assert not output.exists()


def test_error_lines_make_the_exit_code_1_unless_keep_going(tmp_path, capsys):
    """A finished output with an error line exits 1 (with --keep-going 0); the error item is retried by each rerun
    and its line replaced, the file staying in manifest order."""
    manifest = _manifest(tmp_path, {"id": "a", "audio": 3, "prompt": "hi"}, {"id": "b", "audio": None, "prompt": "hi"})
    output = tmp_path / "out.jsonl"
    assert infer_cli(["--manifest", str(manifest), "--output", str(output)]) == 1
    assert infer_cli(["--manifest", str(manifest), "--output", str(output), "--keep-going"]) == 0
    assert "2 already answered in" in capsys.readouterr().err
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "b"] and all("error" in line for line in lines)

"""The command line under hostile and careless input (issue 19): a known error is one `error: ...` line and a
non-zero exit, the traceback only with --debug; sizes and output paths are checked before any work."""

import json
import shutil
import subprocess
import sys

import pytest

from qscope_rl.cli import main


@pytest.fixture
def world_env(world, world_cache, monkeypatch, pack_files):
    monkeypatch.setenv("QSCOPE_RL_CACHE", str(world_cache))
    return world


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) as the console script gives them (it prints a SystemExit's message)."""
    try:
        code = main(list(argv))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_console_script_prints_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    script = shutil.which("qscope-rl")
    command = [script] if script else [sys.executable, "-m", "qscope_rl.cli"]
    plain = subprocess.run(command + ["sae-info", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert plain.returncode == 1
    assert plain.stderr.strip() == f"error: SAE path '{tmp_path / 'nowhere'}' does not exist"
    code, _, err = run_cli(capsys, "sae-info", str(tmp_path / "nowhere"), "--debug")
    assert code == 1 and "Traceback" in err and "SAELoadError" in err and err.strip().endswith("does not exist")


@pytest.mark.parametrize("argv, flag", [
    (["steer", "-n", "0"], "-n/--n-prompts: must be a positive integer"),
    (["steer", "--max-new-tokens", "0"], "--max-new-tokens: must be a positive integer"),
    (["steer", "--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    (["classify", "eval", "--seeds-per-class", "4,0"], "--seeds-per-class: must be a positive integer"),
    (["synthesize", "--dataset-size", "0"], "--dataset-size: must be a positive integer"),
    (["features", "discover", "language", "--top-k", "0"], "--top-k: must be a positive integer"),
    (["sae-info", "x", "--k", "0"], "--k: must be a positive integer"),
    (["steer", "--device", "cuda:7"], "--device: 'cuda:7'"),
    (["steer", "--device", "gpu"], "--device: 'gpu' is not a torch device"),
])
def test_out_of_range_sizes_fail_before_any_work_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert flag in capsys.readouterr().err


def test_sae_config_errors_name_file_and_field(tmp_path, capsys):
    folder = tmp_path / "sl"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": "96"}))
    (folder / "sae_weights.safetensors").write_bytes(b"")
    code, _, err = run_cli(capsys, "sae-info", str(folder))
    assert code == 1 and "cfg.json: field 'd_in' must be an integer, got the string '96'" in one_error_line(err)


def test_bad_input_files_are_named(world_env, tmp_path, capsys):
    binary, latin1 = tmp_path / "prompts.bin", tmp_path / "latin1.txt"
    binary.write_bytes(b"\x00\x01\x02\xff" * 10)
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    cases = [(tmp_path / "none.txt", "does not exist"), (tmp_path, "is a folder"),
             (binary, "is a binary file, not text"), (latin1, "is not UTF-8 text")]
    for path, message in cases:
        code, _, err = run_cli(capsys, "steer", "--feature", "1=2", "--prompts", str(path))
        assert code == 1 and str(path) in one_error_line(err) and message in err
    code, _, err = run_cli(capsys, "steer", "--feature", "1=2", "--prompt", "")
    assert code == 1 and "--prompt number 1 is empty" in one_error_line(err)


def test_steer_refuses_a_prompt_longer_than_the_context(world_env, tmp_path, capsys):
    context = world_env.model.config.max_position_embeddings
    (tmp_path / "long.txt").write_text(" ".join(["the"] * (context * 3)) + "\nshort prompt\n")
    code, _, err = run_cli(capsys, "steer", "--feature", "1=2", "--prompts", str(tmp_path / "long.txt"))
    assert code == 1 and f"passes the model's context of {context} tokens" in one_error_line(err)


def test_redundancy_refuses_a_benchmark_name_given_twice(tmp_path, capsys):
    for name in ("f1", "f2"):
        (tmp_path / name).write_text("a text\n")
    code, _, err = run_cli(capsys, "redundancy", "--benchmark", f"A={tmp_path / 'f1'}",
                           "--benchmark", f"A={tmp_path / 'f2'}")
    assert code == 1 and "--benchmark 'A' is given twice" in one_error_line(err)


def test_unwritable_output_is_refused_before_discovery(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "features", "discover", "repetition", "--out", str(tmp_path / "file" / "p.json"))
    assert code == 1 and "--out" in one_error_line(err) and "is not a folder" in err
    code, _, err = run_cli(capsys, "features", "discover", "contrastive", "--out", str(tmp_path))
    assert code == 1 and "is a folder; give a file name" in one_error_line(err)


def test_discovery_on_the_world_reads_the_given_files(world_env, tmp_path, capsys):
    from qscope_rl.features.feature_pack import texts_sha256

    docs = world_env.documents("train")
    positive = [d.text for d in docs if d.loop_char is not None][:12]
    negative = [d.text for d in docs if d.loop_char is None and d.switch_char is None][:12]
    (tmp_path / "pos.txt").write_text("\n".join(positive) + "\n")
    (tmp_path / "neg.txt").write_text("\n".join(negative) + "\n")
    code, out, err = run_cli(capsys, "features", "discover", "contrastive", "--positive", str(tmp_path / "pos.txt"),
                             "--negative", str(tmp_path / "neg.txt"), "--top-k", "4", "--json")
    assert code == 0, err
    data = json.loads(out)["contrastive"]["data"]
    assert data["sha256"] == {"positive": texts_sha256(positive), "negative": texts_sha256(negative)}
    (tmp_path / "langs.jsonl").write_text("".join(json.dumps({"text": d.text, "lang": d.lang}) + "\n"
                                                  for d in docs[:40]))
    code, out, err = run_cli(capsys, "features", "discover", "language", "--texts", str(tmp_path / "langs.jsonl"),
                             "--top-k", "4", "--json")
    assert code == 0, err
    by_lang = {}
    for d in docs[:40]:
        by_lang.setdefault(d.lang, []).append(d.text)
    for pack in json.loads(out).values():
        lang = pack["data"]["language"]
        assert pack["data"]["sha256"][lang] == texts_sha256(by_lang[lang])
    code, _, err = run_cli(capsys, "features", "discover", "contrastive", "--positive", str(tmp_path / "pos.txt"))
    assert code == 1 and "need both --positive and --negative" in one_error_line(err)


def test_binary_recipe_is_named(tmp_path, capsys):
    (tmp_path / "r.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    code, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "r.yaml"), "--dry-run")
    assert code == 2 and "is a binary file, not YAML" in one_error_line(err)

"""The `tesela` command as a tool: fast help, help and defaults on every flag, one-line user
errors with exit code 2 (tracebacks only with -v), flags generated from EngineArgs, and every
benchmark runnable on `tiny` on CPU."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tesela import cli
from tesela.engine_args import EngineArgs

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- help -----------------------------------------------------------------------------------


def test_help_is_fast_and_imports_no_torch():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    probe = "import sys, tesela.cli; print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
        ).stdout.strip()
        == "False"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tesela.cli", "--help"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and "generate" in result.stdout and "bench" in result.stdout
    assert time.monotonic() - started < 1.0


def subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner_name, inner in subparsers(sub):
                    yield f"{name} {inner_name}", inner


def test_every_flag_has_help_and_shows_its_default():
    parser = cli.build_parser(None)  # every subcommand with its flags
    commands = dict(subparsers(parser))
    assert {"generate", "serve", "doctor", "bench prefill", "bench decode", "bench serve"} <= set(
        commands
    )
    for name, sub in commands.items():
        if name == "bench":
            continue
        text = sub.format_help()
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name}: {action.option_strings} has no help"
            if action.option_strings:
                assert "default:" in sub._get_formatter()._expand_help(action) or (
                    "(default:" in action.help
                ), f"{name}: {action.option_strings} shows no default"
        # Commands that build an engine from flags take every EngineArgs flag.
        if name in ("generate", "serve", "bench serve"):
            assert "--max-num-seqs" in text and "--piecewise-cudagraph" in text


def test_engine_flags_are_generated_from_engine_args():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    defaults = EngineArgs.from_cli_args(parser.parse_args([]))
    assert defaults == EngineArgs()
    args = parser.parse_args(
        ["--piecewise-cudagraph", "compiled", "--capture-sizes", "4,16", "--disable-cudagraph"]
    )
    parsed = EngineArgs.from_cli_args(args)
    assert parsed.piecewise_cudagraph == "compiled" and parsed.capture_sizes == (4, 16)
    assert parsed.disable_cudagraph
    # Every field is a flag: adding an option to EngineArgs adds it to the CLI and the server.
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(EngineArgs)} <= flags
    # The old spellings still parse, into the new fields.
    old = EngineArgs.from_cli_args(parser.parse_args(["--prefill-graph", "breakable"]))
    assert old.piecewise_cudagraph == "breakable"


def test_llm_keywords_are_engine_args_with_old_names_still_accepted():
    with pytest.warns(DeprecationWarning, match="is now"):
        args = EngineArgs.from_kwargs("tiny", prefill_graph="none", verify_graphs=True)
    assert args.piecewise_cudagraph == "none" and args.verify_cudagraphs
    with pytest.raises(TypeError, match="unknown engine option.*max_num_seq\\b"):
        EngineArgs.from_kwargs("tiny", max_num_seq=4)


# ---- user errors ----------------------------------------------------------------------------


def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path):
    cases = {
        "missing folder": (["generate", "--model", str(tmp_path / "nope")], "neither a folder"),
        "zero max tokens": (["generate", "--max-tokens", "0"], "max_tokens must be a positive"),
        "empty prompt": (["generate", ""], "a prompt is empty"),
        "bad dtype": (["generate", "--dtype", "int3"], "unsupported dtype 'int3'"),
    }
    for name, (argv, message) in cases.items():
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, name
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, (name, err)


def write_folder(path: Path, config: dict | str) -> Path:
    path.mkdir()
    text = config if isinstance(config, str) else json.dumps(config)
    (path / "config.json").write_text(text)
    return path


def test_broken_model_folders_name_the_file(capsys, tmp_path, checkpoints):
    bad_json = write_folder(tmp_path / "bad-json", "{not json")
    code, _, err = run_cli(capsys, "generate", "--model", str(bad_json))
    assert code == 2 and f"{bad_json / 'config.json'} is not valid JSON" in err
    arch = write_folder(tmp_path / "arch", {"architectures": ["GPT2LMHeadModel"]})
    code, _, err = run_cli(capsys, "generate", "--model", str(arch))
    assert code == 2 and "unknown architecture 'GPT2LMHeadModel'" in err and "config.json" in err
    # A real checkpoint whose weights file is cut short.
    source, _ = checkpoints["qwen2"]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for file in source.iterdir():
        (corrupt / file.name).write_bytes(file.read_bytes())
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "generate", "--model", str(corrupt))
    assert code == 2 and f"{weights} is not a readable safetensors file" in err
    assert err.count("\n") == 1


def test_verbose_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="max_tokens must be a positive"):
        cli.main(["-v", "generate", "--max-tokens", "0"])


# ---- generate and bench on tiny -------------------------------------------------------------


def test_generate_shows_progress_on_long_runs(capsys):
    code, out, err = run_cli(capsys, "generate", "--max-tokens", "4", "a", "b")
    assert code == 0 and out.count("---") == 2
    assert "Generating" in err and "tok" in err


def test_bench_prefill_decode_and_latency_run_on_tiny_on_cpu(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("asserts the CPU notes")
    common = ["--model", "tiny", "--output-dir", str(tmp_path)]
    code, out, _ = run_cli(
        capsys,
        "bench",
        "prefill",
        *common,
        "--num-tokens",
        "16,4096",
        "--repeat",
        "1",
        "--warmup",
        "0",
    )
    assert code == 0
    assert "| 16 |" in out and "note: skipped num_tokens 4096" in out
    assert "note: skipped full-graph on cpu: it captures CUDA graphs" in out
    assert (tmp_path / "prefill-tiny.json").is_file()
    code, out, _ = run_cli(
        capsys,
        "bench",
        "decode",
        *common,
        "--batch-sizes",
        "1,2",
        "--contexts",
        "64,4096",
        "--repeat",
        "1",
    )
    assert code == 0 and "| 2 | 64 |" in out and "note: skipped context 4096" in out
    code, out, _ = run_cli(
        capsys,
        "bench",
        "latency",
        *common,
        "--batch-sizes",
        "1",
        "--input-len",
        "4",
        "--output-len",
        "4",
    )
    assert code == 0 and (tmp_path / "latency-tiny.json").is_file()

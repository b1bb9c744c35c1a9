"""No command writes into, over or around its inputs (DESIGN section 7): each refuses before
writing anything, naming both paths, and the input's files stay byte-identical."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from wspo.paths import OutputPathError, check_output


def snapshot(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env={"TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"} | dict(__import__("os").environ))


@pytest.fixture(scope="module")
def lora_adapter(tiny_models, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["weak_ref"])
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(out)
    return out


@pytest.mark.parametrize("command", ["train", "export", "extrapolate", "precompute", "eval"])
def test_output_inside_or_equal_to_an_input_is_refused(command, tiny_models, lora_adapter, tmp_path):
    model = tiny_models["weak_ref"]
    before = snapshot(model)
    adapter_before = snapshot(lora_adapter)
    if command == "train":
        result = run_cli("wspo.train.cli", "--model_name_or_path", model, "--shards", tmp_path, "--output_dir", model,
                         "--loss", "sft")
        expected = f"output_dir {model.resolve()} is the input model_name_or_path"
    elif command == "export":
        result = run_cli("wspo.train.export", "--adapter", lora_adapter, "--base_model", model, "--output_dir", model)
        expected = f"output_dir {model.resolve()} is the input base_model"
    elif command == "extrapolate":
        result = run_cli("wspo.extrapolate.cli", "--sft", model, "--aligned", tiny_models["weak_aligned"], "--alpha", "0.3",
                         "--output_dir", model / "expo")
        expected = f"output_dir {(model / 'expo').resolve()} lies inside the input sft {model.resolve()}"
    elif command == "precompute":
        result = run_cli("wspo.precompute.cli", "--weak_ref", model, "--weak_aligned", tiny_models["weak_aligned"],
                         "--output_dir", model.parent)
        expected = f"output_dir {model.parent.resolve()} contains the input weak_ref {model.resolve()}"
    else:
        result = run_cli("wspo.evaluation.cli", "generate", "--model", model, "--dataset", "embedded",
                         "--output_file", model / "answers.json")
        expected = f"output_file {(model / 'answers.json').resolve()} lies inside the input model {model.resolve()}"
    assert result.returncode == 1, result.stderr[-2000:]
    assert expected in result.stderr and "nothing was written" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(model) == before and snapshot(lora_adapter) == adapter_before


def test_file_valued_and_read_only_output_paths(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputPathError, match="is an existing file, not a folder"):
        check_output(a_file, {})
    with pytest.raises(OutputPathError, match="cannot be created: .* is a file"):
        check_output(a_file / "out", {})
    # Hub names that are not local paths are not inputs on this machine.
    assert check_output(tmp_path / "out", {"model": "Qwen/Qwen2-7B"}) == (tmp_path / "out").resolve()
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here to make a folder read-only for root")
    try:
        with pytest.raises(OutputPathError, match="cannot be written"):
            check_output(locked / "out", {})
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)

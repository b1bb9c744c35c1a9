"""ExPO (`wspo-extrapolate`): every output tensor against a direct computation on full state dicts."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wspo.extrapolate import CheckpointError, SwallowedStepWarning, extrapolate
from wspo.extrapolate.cli import main
from wspo.extrapolate.tensors import OutputTensor, StreamingShardWriter, parse_size, plan_shards


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The whole checkpoint, the plain way (index + safetensors.torch.load_file)."""
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(model_dir / name))
    return state


def direct(sft: dict, aligned: dict, alpha: float) -> dict[str, torch.Tensor]:
    """theta_aligned + alpha * (theta_aligned - theta_sft), in float32."""
    return {k: aligned[k].float() + alpha * (aligned[k].float() - sft[k].float()) for k in aligned}


def save_sharded(src: Path, out: Path, dtype: torch.dtype, max_shard_size: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(dtype)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def sharded(tiny_models, tmp_path_factory):
    """The tiny weak pair (tied embeddings) saved in several shards, in float32 and bfloat16."""
    root = tmp_path_factory.mktemp("expo_inputs")
    models = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        # Different shard sizes for the two models: the tool must not rely on matching layouts.
        models[f"sft_{tag}"] = save_sharded(tiny_models["weak_ref"], root / f"sft_{tag}", dtype, "300KB")
        models[f"aligned_{tag}"] = save_sharded(tiny_models["weak_aligned"], root / f"aligned_{tag}", dtype, "200KB")
    assert len(list(models["sft_f32"].glob("model-*.safetensors"))) > 2
    return models


def logits_of(model_dir_or_state, config_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model_dir_or_state, dict):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_dir)), dtype=torch.float32)
        missing, unexpected = model.load_state_dict(model_dir_or_state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to embed_tokens
        model.tie_weights()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir_or_state), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids).logits


def test_float32_sharded_several_alphas_exact(sharded, tmp_path, capsys):
    out = tmp_path / "out"
    # Both spellings of several alphas at once.
    rc = main(["--sft", str(sharded["sft_f32"]), "--aligned", str(sharded["aligned_f32"]),
               "--alpha", "0.3", "0.5", "--alpha", "-0.2", "--output_dir", str(out), "--max_shard_size", "250KB"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "alphas: 0.3, 0.5, -0.2" in printed and "peak RSS" in printed and "bytes written" in printed

    sft, aligned = load_state_dict(sharded["sft_f32"]), load_state_dict(sharded["aligned_f32"])
    input_ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    for alpha in (0.3, 0.5, -0.2):
        result_dir = out / f"alpha-{alpha}"
        assert len(list(result_dir.glob("model-*.safetensors"))) > 2  # sharded, with an index
        assert (result_dir / "model.safetensors.index.json").exists()
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (result_dir / name).exists(), name
        expected = direct(sft, aligned, alpha)
        written = load_state_dict(result_dir)
        assert written.keys() == expected.keys()
        for name, tensor in expected.items():
            assert written[name].dtype == torch.float32
            assert torch.equal(written[name], tensor), name  # bit-exact
        torch.testing.assert_close(logits_of(result_dir, result_dir, input_ids),
                                   logits_of(expected, result_dir, input_ids), rtol=0, atol=0)


def test_bfloat16_input_rounds_the_float32_result(sharded, tmp_path):
    sft, aligned = load_state_dict(sharded["sft_bf16"]), load_state_dict(sharded["aligned_bf16"])
    extrapolate(sharded["sft_bf16"], sharded["aligned_bf16"], [0.3], tmp_path / "bf16", progress=False)
    extrapolate(sharded["sft_bf16"], sharded["aligned_bf16"], [0.3], tmp_path / "f32", out_dtype="float32",
                progress=False)
    as_bf16, as_f32 = load_state_dict(tmp_path / "bf16/alpha-0.3"), load_state_dict(tmp_path / "f32/alpha-0.3")
    for name, tensor in direct(sft, aligned, 0.3).items():
        assert as_bf16[name].dtype == torch.bfloat16 and torch.equal(as_bf16[name], tensor.to(torch.bfloat16)), name
        assert as_f32[name].dtype == torch.float32 and torch.equal(as_f32[name], tensor), name
    assert json.loads((tmp_path / "f32/alpha-0.3/config.json").read_text())["dtype"] == "float32"
    assert json.loads((tmp_path / "bf16/alpha-0.3/config.json").read_text())["dtype"] == "bfloat16"


def test_tied_embeddings_written_once(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    assert json.loads((tiny_models["weak_ref"] / "config.json").read_text())["tie_word_embeddings"]
    extrapolate(tiny_models["weak_ref"], tiny_models["weak_aligned"], [0.4], tmp_path, progress=False)
    written = load_state_dict(tmp_path / "alpha-0.4")
    assert "model.embed_tokens.weight" in written and "lm_head.weight" not in written
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "alpha-0.4"), dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, written["model.embed_tokens.weight"])


def test_untied_head_is_extrapolated(tiny_models, tmp_path):
    from wspo.embedded.models import build_model, perturb_model

    build_model(tmp_path / "sft", tiny_models["tokenizer"], "strong", seed=3)
    perturb_model(tmp_path / "sft", tmp_path / "aligned", seed=4)
    extrapolate(tmp_path / "sft", tmp_path / "aligned", [0.25], tmp_path / "out", progress=False)
    expected = direct(load_state_dict(tmp_path / "sft"), load_state_dict(tmp_path / "aligned"), 0.25)
    written = load_state_dict(tmp_path / "out/alpha-0.25")
    assert "lm_head.weight" in written and written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def make_adapter(base_dir: Path, out: Path, use_rslora: bool = False, use_dora: bool = False):
    """A LoRA adapter with nonzero B (a fresh adapter's delta is zero) and a retrained final norm."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        modules_to_save=None if use_dora else ["norm"], use_rslora=use_rslora, use_dora=use_dora)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(str(out))
    return model


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_adapter_scales_the_delta(tiny_models, tmp_path, use_rslora):
    sft_dir = tiny_models["weak_ref"]
    peft_model = make_adapter(sft_dir, tmp_path / "adapter", use_rslora=use_rslora)
    extrapolate(sft_dir, tmp_path / "adapter", [0.0, 0.5], tmp_path / "out", progress=False)

    sft = load_state_dict(sft_dir)
    adapter = load_file(tmp_path / "adapter/adapter_model.safetensors")
    scaling = 8 / 4**0.5 if use_rslora else 8 / 4
    prefix = "base_model.model."
    adapted, replaced = set(), set()
    for alpha in (0.0, 0.5):
        written = load_state_dict(tmp_path / f"out/alpha-{alpha}")
        assert written.keys() == sft.keys()
        for key in adapter:
            name = key[len(prefix):]
            if name.endswith(".lora_A.weight"):
                target = name.replace(".lora_A.weight", ".weight")
                delta = (adapter[key.replace("lora_A", "lora_B")] @ adapter[key]) * scaling
                assert delta.abs().max() > 1e-3  # the test would prove nothing with a zero delta
                torch.testing.assert_close(written[target], sft[target] + (1 + alpha) * delta, rtol=0, atol=1e-6)
                adapted.add(target)
            elif ".lora_B." not in name:  # modules_to_save: a full replacement, extrapolated as usual
                target = name.replace(".modules_to_save.", ".")
                expected = adapter[key] + alpha * (adapter[key] - sft[target])
                torch.testing.assert_close(written[target], expected, rtol=0, atol=1e-6)
                replaced.add(target)
        for name in sft.keys() - adapted - replaced:
            assert torch.equal(written[name], sft[name]), name
    assert len(adapted) == 8 and "model.norm.weight" in replaced

    # Cross-check with PEFT's own merge: alpha = 0 is the adapter merged into the SFT model.
    merged = peft_model.merge_and_unload().state_dict()
    written = load_state_dict(tmp_path / "out/alpha-0.0")
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6)


def test_dora_adapter_is_refused(tiny_models, tmp_path):
    make_adapter(tiny_models["weak_ref"], tmp_path / "dora", use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        extrapolate(tiny_models["weak_ref"], tmp_path / "dora", [0.3], tmp_path / "out", progress=False)


def edited_copy(src: Path, out: Path, edit_state=None, edit_config=None) -> Path:
    """A single-file copy of a model with its state dict and/or config edited."""
    out.mkdir()
    state = load_state_dict(src)
    if edit_state:
        edit_state(state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_mismatches_name_the_tensor_or_field(tiny_models, tmp_path, capsys):
    sft, aligned = tiny_models["weak_ref"], tiny_models["weak_aligned"]
    missing = edited_copy(aligned, tmp_path / "missing", edit_state=lambda s: s.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is in the SFT model but not in the aligned"):
        extrapolate(sft, missing, [0.3], tmp_path / "o1", progress=False)

    def widen(state):
        state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(300, 128)
    shape = edited_copy(aligned, tmp_path / "shape", edit_state=widen)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight': shape \[256, 128\]"):
        extrapolate(sft, shape, [0.3], tmp_path / "o2", progress=False)

    def llama(config):
        config["architectures"] = ["LlamaForCausalLM"]
    arch = edited_copy(aligned, tmp_path / "arch", edit_config=llama)
    with pytest.raises(CheckpointError, match=r"config field 'architectures' differs"):
        extrapolate(sft, arch, [0.3], tmp_path / "o3", progress=False)

    # The command line reports the same message, without a traceback.
    assert main(["--sft", str(sft), "--aligned", str(arch), "--alpha", "0.3", "--output_dir", str(tmp_path / "o4")]) == 1
    assert "config field 'architectures' differs" in capsys.readouterr().err


def test_bfloat16_swallowed_step_warns(sharded, tmp_path):
    # Aligned = SFT moved by about one bfloat16 ulp: a step of alpha = 0.1 of that rounds away.
    nudge = lambda state: state.update({k: (v.float() * (1 + 2**-7)).to(torch.bfloat16) for k, v in state.items()})
    aligned = edited_copy(sharded["sft_bf16"], tmp_path / "nudged", edit_state=nudge)
    with pytest.warns(SwallowedStepWarning, match="--out_dtype float32"):
        summary = extrapolate(sharded["sft_bf16"], aligned, [0.1], tmp_path / "o1", progress=False)
    sft, nudged = load_state_dict(sharded["sft_bf16"]), load_state_dict(aligned)
    changed = {k for k in sft if not torch.equal(sft[k], nudged[k])}  # all but the zero biases
    assert len(changed) > 15 and {name for name, _ in summary.swallowed[0.1]} == changed
    with warnings.catch_warnings():
        warnings.simplefilter("error", SwallowedStepWarning)  # float32 keeps the step: no warning
        extrapolate(sharded["sft_bf16"], aligned, [0.1], tmp_path / "o2", out_dtype="float32", progress=False)
        # A step well above bfloat16's resolution does not warn. (The perturbed pair's norm weights,
        # 1 +- 0.02, do warn at alpha = 0.1: a step of ~0.002 is under half an ulp at 1.0, 2**-8.)
        extrapolate(sharded["sft_bf16"], sharded["aligned_bf16"], [0.5], tmp_path / "o3", progress=False)


def test_existing_output_needs_overwrite(tiny_models, tmp_path):
    extrapolate(tiny_models["weak_ref"], tiny_models["weak_aligned"], [0.3], tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        extrapolate(tiny_models["weak_ref"], tiny_models["weak_aligned"], [0.3], tmp_path, progress=False)
    extrapolate(tiny_models["weak_ref"], tiny_models["weak_aligned"], [0.3], tmp_path, overwrite=True, progress=False)


def test_streaming_writer_matches_safetensors(tmp_path):
    """Mixed dtypes and odd sizes: the hand-written file reads back with safetensors."""
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7), "c": torch.tensor(2.5),
               "d": torch.arange(5, dtype=torch.int64), "e": torch.randn(0, 4)}
    (shard,) = plan_shards([OutputTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 10**6)
    writer = StreamingShardWriter(tmp_path / "x.safetensors", shard)
    for t in shard:
        writer.write(tensors[t.name])
    writer.close()
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(123) == 123
    assert shutil.which("wspo-extrapolate")


# -- tied head stored separately, adapter base check, run record, non-finite (issues 11 and 12) --


def test_tied_sft_with_separate_aligned_head_is_extrapolated(tiny_models, tmp_path):
    """SFT ties lm_head to embed_tokens (stores no head); the aligned checkpoint stores lm_head:
    the head is extrapolated against the SFT's embedding."""
    sft_dir = tiny_models["weak_ref"]

    def untie(state):
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone() * 1.01

    def untie_config(config):
        config["tie_word_embeddings"] = False
    aligned = edited_copy(tiny_models["weak_aligned"], tmp_path / "aligned", edit_state=untie, edit_config=untie_config)
    (aligned / "wspo_run.json").write_text(json.dumps({"loss": "wspo", "training": "the aligned model's run"}))
    extrapolate(sft_dir, aligned, [0.5], tmp_path / "out", progress=False)
    sft, al = load_state_dict(sft_dir), load_state_dict(aligned)
    written = load_state_dict(tmp_path / "out/alpha-0.5")
    expected_head = al["lm_head.weight"] + 0.5 * (al["lm_head.weight"] - sft["model.embed_tokens.weight"])
    assert torch.equal(written["lm_head.weight"], expected_head)
    embed = "model.embed_tokens.weight"
    assert torch.equal(written[embed], al[embed] + 0.5 * (al[embed] - sft[embed]))
    run = json.loads((tmp_path / "out/alpha-0.5/wspo_run.json").read_text())
    assert run["command"] == "wspo-extrapolate" and run["extrapolation"]["alpha"] == 0.5
    assert run["aligned_training_run"] == str(aligned / "wspo_run.json") and "training" not in run
    assert run["extrapolation"]["head_extrapolated_from_tied_embedding"] == "model.embed_tokens.weight"


def test_adapter_on_another_base_is_refused(tiny_models, tmp_path, capsys):
    make_adapter(tiny_models["weak_ref"], tmp_path / "adapter")
    other = tmp_path / "other_sft"
    shutil.copytree(tiny_models["weak_aligned"], other)  # same shapes, another model
    argv = ["--sft", str(other), "--aligned", str(tmp_path / "adapter"), "--alpha", "0.3", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"trained on base model {str(tiny_models['weak_ref'])!r}" in err and "--allow_base_mismatch" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    assert main(argv + ["--allow_base_mismatch"]) == 0
    assert (tmp_path / "o/alpha-0.3/model.safetensors").is_file()


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_non_finite_alpha_is_refused_up_front(tiny_models, tmp_path, capsys, alpha):
    argv = ["--sft", str(tiny_models["weak_ref"]), "--aligned", str(tiny_models["weak_aligned"]),
            "--alpha", "0.3", f"--alpha={alpha}", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 1
    assert f"--alpha {float(alpha)}: must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_overflowing_alpha_stops_and_leaves_nothing_complete(sharded, tmp_path, capsys):
    """float16 tops out at 65504: an alpha of 1e6 times a step of ~0.1 overflows it."""
    out = tmp_path / "o"
    extrapolate(sharded["sft_f32"], sharded["aligned_f32"], [2.0], out, progress=False)  # an earlier good output
    before = {p.name: p.read_bytes() for p in (out / "alpha-2.0").iterdir()}
    argv = ["--sft", str(sharded["sft_f32"]), "--aligned", str(sharded["aligned_f32"]), "--alpha", "0.5", "1e6",
            "--out_dtype", "float16", "--output_dir", str(out), "--overwrite"]
    assert main(argv) == 1
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err.startswith("wspo-extrapolate: error: alpha=1000000.0: tensor ") and "overflows float16" in err
    # Neither alpha of the failed run is published, no temporary folder is left, the old output is intact.
    assert sorted(p.name for p in out.iterdir()) == ["alpha-2.0"]
    assert {p.name: p.read_bytes() for p in (out / "alpha-2.0").iterdir()} == before


def test_non_finite_input_is_named(tiny_models, tmp_path):
    def poison(state):
        state["model.norm.weight"][3] = float("nan")
    aligned = edited_copy(tiny_models["weak_aligned"], tmp_path / "nan", edit_state=poison)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': the input checkpoints hold NaN"):
        extrapolate(tiny_models["weak_ref"], aligned, [0.3], tmp_path / "o", progress=False)
    assert not any((tmp_path / "o").iterdir())

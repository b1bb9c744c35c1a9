"""A PEFT LoRA adapter read as "the SFT model plus a delta per adapted weight".

Supported: `peft_type` LORA with plain LoRA on linear layers (`lora_A.weight` / `lora_B.weight`),
`lora_alpha` / r or rsLoRA's `lora_alpha` / sqrt(r) scaling, per-module ranks and alphas
(`rank_pattern`, `alpha_pattern`), `fan_in_fan_out`, and `modules_to_save` (full replacement
tensors, extrapolated like any full-model tensor). Anything else the adapter holds (DoRA
magnitudes, LoRA on embeddings, LoRA biases, trainable tokens, other PEFT methods) is an error that
names it: a silently ignored part of the adapter would give a wrong model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .tensors import CheckpointError, LazyCheckpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix in front of the base model's own tensor names


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraWeight:
    """One adapted weight `target` (a name in the SFT checkpoint): delta = (B @ A) * scaling."""

    target: str
    lora_a: str  # tensor names in the adapter file
    lora_b: str
    scaling: float
    fan_in_fan_out: bool  # the base layer stores W transposed (GPT-2's Conv1D): delta = (B @ A).T


@dataclass
class LoraAdapter:
    reader: LazyCheckpoint
    config: dict
    weights: dict[str, LoraWeight]  # target tensor name -> its LoRA factors
    replaced: dict[str, str]  # modules_to_save: target tensor name -> tensor name in the adapter file

    def delta_rows(self, target: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """Rows [start, end) of the float32 delta of an adapted weight."""
        lora = self.weights[target]
        a = self.reader.read(lora.lora_a).to(torch.float32)  # [r, in]: small, read whole
        b = self.reader.read(lora.lora_b).to(torch.float32)  # [out, r]
        if lora.fan_in_fan_out:  # W is [in, out]; its rows are columns of A
            a_part = a if rows is None else a[:, rows[0]:rows[1]]
            return (b @ a_part).T * lora.scaling
        b_part = b if rows is None else b[rows[0]:rows[1]]
        return (b_part @ a) * lora.scaling


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(adapter_dir: str | Path) -> LoraAdapter:
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    where = f"{adapter_dir / ADAPTER_CONFIG}"
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    unsupported = {
        "use_dora": "DoRA adapters (use_dora) are not supported: merge the adapter with PEFT first",
        "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported",
        "lora_bias": "LoRA biases (lora_bias) are not supported",
        "layer_replication": "layer_replication is not supported",
    }
    for field, message in unsupported.items():
        if config.get(field):
            raise CheckpointError(f"{where}: {message}")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")

    reader = LazyCheckpoint(adapter_dir, ADAPTER_WEIGHTS)
    pairs: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for name in reader.names():
        if not name.startswith(PREFIX):
            raise CheckpointError(f"adapter tensor {name!r}: expected PEFT's prefix {PREFIX!r}")
        inner = name[len(PREFIX):]
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", inner)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = name
        elif ".lora_" in inner:  # lora_embedding_A/B, lora_magnitude_vector (DoRA), lora_B.bias, ...
            raise CheckpointError(f"adapter tensor {name!r} is not supported (only lora_A/lora_B of linear "
                                  f"layers and modules_to_save; DoRA and embedding LoRA are not)")
        else:
            # modules_to_save: PEFT >= 0.13 saves them under the base name, older versions as
            # `<module>.modules_to_save.<param>`.
            replaced[inner.replace(".modules_to_save.", ".")] = name

    r_default, alpha_default = config["r"], config["lora_alpha"]
    weights: dict[str, LoraWeight] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"adapter module {module!r} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a_info, b_info = reader.tensors[pair["A"]], reader.tensors[pair["B"]]
        r = a_info.shape[0]  # the rank actually trained (rank_pattern may change it per module)
        if b_info.shape[1] != r:
            raise CheckpointError(f"adapter module {module!r}: lora_A has rank {r} but lora_B {b_info.shape}")
        if r != _pattern_value(config.get("rank_pattern") or {}, module, r_default):
            raise CheckpointError(f"adapter module {module!r}: lora_A has rank {r}, adapter_config says "
                                  f"{_pattern_value(config.get('rank_pattern') or {}, module, r_default)}")
        lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha_default)
        scaling = lora_alpha / math.sqrt(r) if config.get("use_rslora") else lora_alpha / r
        weights[f"{module}.weight"] = LoraWeight(f"{module}.weight", pair["A"], pair["B"], scaling,
                                                 bool(config.get("fan_in_fan_out")))
    return LoraAdapter(reader, config, weights, replaced)


def check_against_base(adapter: LoraAdapter, sft: LazyCheckpoint) -> None:
    """Every adapted or replaced tensor exists in the SFT model with the shape the adapter implies."""
    for target, lora in adapter.weights.items():
        if target not in sft.tensors:
            raise CheckpointError(f"tensor {target!r}: the adapter adapts it but the SFT model has no such tensor "
                                  f"(wrong base model, or a tied weight the SFT checkpoint does not store)")
        out_features = adapter.reader.tensors[lora.lora_b].shape[0]
        in_features = adapter.reader.tensors[lora.lora_a].shape[1]
        expected = (in_features, out_features) if lora.fan_in_fan_out else (out_features, in_features)
        if sft.tensors[target].shape != expected:
            raise CheckpointError(f"tensor {target!r}: shape {list(sft.tensors[target].shape)} in the SFT model "
                                  f"but the adapter's delta is {list(expected)}")
    for target, name in adapter.replaced.items():
        if target not in sft.tensors:
            raise CheckpointError(f"tensor {target!r}: the adapter saves it (modules_to_save) but the SFT model has "
                                  f"no such tensor (a tied weight the SFT checkpoint does not store?)")
        if target in adapter.weights:
            raise CheckpointError(f"tensor {target!r} is both LoRA-adapted and in modules_to_save")
        if sft.tensors[target].shape != adapter.reader.tensors[name].shape:
            raise CheckpointError(f"tensor {target!r}: shape {list(sft.tensors[target].shape)} in the SFT model but "
                                  f"{list(adapter.reader.tensors[name].shape)} in the adapter (modules_to_save)")


def check_base_model(adapter_dir: str | Path, sft_dir: str | Path, allow_mismatch: bool = False) -> None:
    """The adapter was trained on `sft_dir`: its adapter_config's base_model_name_or_path names the
    same model (the same string, or the same directory once resolved). Applying an adapter to
    another model of the same shapes would silently produce a meaningless extrapolation."""
    base = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if allow_mismatch:
        return
    same = base is not None and (base == str(sft_dir) or Path(base).expanduser().resolve() == Path(sft_dir).resolve())
    if not same:
        raise CheckpointError(
            f"{Path(adapter_dir) / ADAPTER_CONFIG}: the adapter was trained on base model {base!r}, not on --sft "
            f"{str(sft_dir)!r}; pass --allow_base_mismatch to apply it to --sft anyway")

"""Locating, fingerprinting and loading models and tokenizers (local directories or hub names)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import os
from pathlib import Path

import torch

from wspo.errors import ConfigError, InputError, InputPathError
from wspo.logprobs import fuse_head_normaliser, unfuse_head_normaliser

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
CONFIG_FILES = ("config.json", "generation_config.json")


def resolve_model_dir(name_or_path: str, option: str = "model") -> Path:
    """A local directory, or the local snapshot of a hub model (downloaded when the network allows).

    `option` names the setting in the error, so a typo in `weak_ref` says `weak_ref`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputPathError(f"{option}: {path} is a directory without config.json, not a model")
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise InputPathError(f"{option}: {name_or_path} is not a model directory (and not a hub name 'org/model')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated repo: one clear message
        raise InputPathError(f"{option}: cannot find {name_or_path!r} locally or on the hub ({type(e).__name__}: {e})") from None


def check_weights(model_dir: Path, option: str = "model") -> None:
    """Fail early, naming the file, on a model folder whose weights are missing or cut short
    (an interrupted download or copy), instead of a loader traceback later."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise InputError(f"{option}: {index} is not a valid safetensors index ({e})") from None
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors")) or sorted(p for p in model_dir.iterdir() if p.suffix in (".bin", ".pt"))
    if not files:
        raise InputPathError(f"{option}: {model_dir} holds no weights (no *.safetensors or *.bin files)")
    for path in files:
        if not path.exists():
            raise InputPathError(f"{option}: {path} is listed in the safetensors index but missing")
        if path.suffix != ".safetensors":
            continue
        # A safetensors file is an 8-byte header length, the JSON header, then the data: the
        # header's last offset must equal the data's size, or the file was cut short.
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n)) if 0 < n < size else None
        except (OSError, ValueError):
            header = None
        if not isinstance(header, dict):
            raise InputError(f"{option}: {path} is not a readable safetensors file (truncated or corrupt)")
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise InputError(f"{option}: {path} is truncated ({size} bytes, its header describes {8 + n + end})")


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model's config and weight files (names and full contents).

    Weak SFT and weak DPO models share every shape, so only the weight bytes tell them apart; a
    1.5B bf16 model hashes in a few seconds, small next to scoring it.
    """
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.name in CONFIG_FILES or p.suffix in WEIGHT_SUFFIXES)
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' is bfloat16 on GPU and float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name_or_path: str | os.PathLike):
    """The fast tokenizer of a folder or hub name; a tokenizer file that does not parse is named."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception for a malformed file
        file = Path(str(name_or_path)) / "tokenizer.json"
        what = f"{file} does not parse" if file.exists() else f"cannot load the tokenizer of {name_or_path}"
        raise InputError(f"{what} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def from_pretrained(name_or_path: str | os.PathLike, dtype: torch.dtype, attn_implementation: str | None = None):
    """`AutoModelForCausalLM.from_pretrained`; an `attn_implementation` (transformers' names, None
    or "auto": its choice) that transformers refuses (not installed, not supported by the model)
    is a ConfigError naming the key."""
    from transformers import AutoModelForCausalLM

    if attn_implementation in (None, "auto"):
        return AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, attn_implementation=attn_implementation)
    except (ValueError, ImportError) as reason:
        raise ConfigError(f"attn_implementation {attn_implementation!r}: {reason}") from None


def load_causal_lm(name_or_path: str | os.PathLike, dtype: torch.dtype, device: str | None = None,
                   attn_implementation: str | None = None):
    """A causal LM for inference: `from_pretrained`, on `device`, in eval mode."""
    return from_pretrained(name_or_path, dtype, attn_implementation).to(device or default_device()).eval()


def release_freed_memory() -> None:
    """After a model is dropped: collect it, and hand its freed memory back to the system.

    A model loaded in another dtype than its checkpoint (a bf16 scorer of float32 weights) is built
    from tensors of a few MiB, below glibc's mmap threshold, so freeing it leaves them in malloc's
    heap: at the Qwen2-0.5B shape 640 MiB stayed resident after the first scorer closed, and the
    second scorer's peak sat that much higher (docs/benchmarks.md). malloc_trim returns them; it
    is glibc's, so other C libraries skip it. CUDA: the caching allocator's free blocks, likewise.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# glibc's mallopt parameters and their defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def freed_memory_kept():
    """While inside: glibc serves every allocation from its heap and hands nothing freed back
    to the kernel, so a training loop reuses the same pages step after step.

    By default glibc maps each block over its mmap threshold (at most 32 MiB: weight gradients,
    the tied embedding's gradient, activations at real shapes) fresh from the kernel and unmaps
    it when freed, and trims the heap's free top: every step then faults its gradients and
    activations in again, page by page. At the Qwen2-0.5B shape on CPU that was ~1M minor faults
    and 15-25 s of a 40-50 s full fine-tuning step; with the memory kept, the steps after the
    first two fault nothing (docs/benchmarks.md, sixth round). The process keeps its high-water
    mark, which every step reaches anyway. On leaving, the defaults come back and the heap is
    trimmed. Elsewhere than glibc: nothing changes.
    """
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        yield False
        return
    _LIBC.mallopt(_M_MMAP_MAX, 0)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim
    try:
        yield True
    finally:
        _LIBC.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        _LIBC.malloc_trim(0)


def _glibc():
    try:  # the symbols this process already has (no library search, no subprocess)
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, TypeError):  # TypeError: Windows takes no None
        return None


_LIBC = _glibc()


def compile_decoder(model: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> torch.nn.Module:
    """`torch.compile(dynamic=True)` of the decoder's forward, set on the instance (undo:
    `uncompile_decoder`): the module's call, and so the hidden-state hook of wspo.logprobs, stays
    eager, and the output head's matmul stays outside the graph (it writes into a reused buffer);
    the no-grad path's log-sum-exp over the head's logits is compiled apart, as one fused
    reduction (wspo.logprobs.fuse_head_normaliser). Returns the decoder."""
    decoder = model.get_decoder()
    decoder.forward = torch.compile(decoder.forward, dynamic=True, backend=backend, mode=mode)
    head = model.get_output_embeddings()
    if head is not None:
        fuse_head_normaliser(head, backend=backend)
    return decoder


def uncompile_decoder(model: torch.nn.Module) -> None:
    """Back to the eager forward and log-sum-exp (after a compile that failed)."""
    model.get_decoder().__dict__.pop("forward", None)  # the class's forward again
    head = model.get_output_embeddings()
    if head is not None:
        unfuse_head_normaliser(head)


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())

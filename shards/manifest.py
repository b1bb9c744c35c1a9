"""The manifest of a shard set: built, found and read (DESIGN section 4).

One manifest per worker: `manifest.json` when one worker wrote the set,
`manifest-00003-of-00008.json` for worker 3 of 8. Phase one builds it (`build_manifest`) and
writes it last (store.write_manifest, with its `manifest_checksum`); readers find the manifests
of a folder (`manifest_paths`), read each with its checks (`load_manifest`: format and
fingerprint versions, checksum, counts against the files) and those of a finished set together
(`read_manifests`: every worker present, all run with the same settings).

    run_fingerprint   the sha256 of a worker's identity (settings, tokenizer, scorers, workers,
                      top-k): what a rerun compares to resume, and what a worker's set-mates share
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import wspo

from .schema import FORMAT_NAME, FORMAT_VERSION, PLAIN_FORMAT_VERSION, canonical_json
from .storage import AnyPath, ShardError
from .tokenization import FINGERPRINT_VERSION
from .topk import TOPK_FORMAT_VERSION

# Manifest entries that every worker of one set must agree on.
SHARED_KEYS = ("run_settings", "tokenizer", "scorers", "topk")


def manifest_name(num_workers: int, worker_index: int) -> str:
    if num_workers == 1:
        return "manifest.json"
    return f"manifest-{worker_index:05d}-of-{num_workers:05d}.json"


def manifest_paths(root: AnyPath) -> list[AnyPath]:
    """The manifests a set's folder names: the workers' in order, else `manifest.json` (which
    may not exist yet)."""
    return sorted(root.glob("manifest-*-of-*.json")) or [root / "manifest.json"]


# -- building -----------------------------------------------------------------------------------


def run_fingerprint(identity: dict) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum: an edit after writing shows."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def build_manifest(identity: dict, command: str, counts: dict, files: list[dict], lengths: dict,
                   reward: dict | None, timing: dict) -> dict:
    """A worker's manifest: what it is (`identity`: run settings, tokenizer, scorers, workers,
    top-k; its `run_fingerprint`), the command that wrote it, what it read and wrote (`counts`,
    the `files` records of store.file_record), the lengths it scored under, the reward summary
    and the timing. Format
    version 3 with top-k columns, else 2, so that sets without top-k stay readable by older readers."""
    return {
        "format": FORMAT_NAME,
        "format_version": TOPK_FORMAT_VERSION if identity.get("topk") else PLAIN_FORMAT_VERSION,
        "toolkit_version": wspo.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_fingerprint": run_fingerprint(identity),
        "command": command,
        **identity,
        "counts": counts,
        "files": files,
        "lengths": lengths,
        "reward": reward,
        "timing": timing,
    }


# -- reading ------------------------------------------------------------------------------------


def load_manifest(path: AnyPath) -> dict:
    """One worker's manifest, read and checked: a wspo manifest of a format and fingerprint version
    this toolkit reads, unedited since written (its checksum), its counts equal to its files'."""
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: manifest is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise ShardError(f"{path}: not a wspo shard manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ShardError(
            f"{path}: shard format version {version!r} is newer than this toolkit reads "
            f"(version {FORMAT_VERSION}); upgrade wspo"
        )
    fingerprint_version = manifest.get("tokenizer", {}).get("fingerprint_version", 1)
    if not isinstance(fingerprint_version, int) or fingerprint_version > FINGERPRINT_VERSION:
        raise ShardError(
            f"{path}: tokenizer fingerprint version {fingerprint_version!r} is newer than this toolkit reads "
            f"(version {FINGERPRINT_VERSION}); upgrade wspo"
        )
    if "checksum" in manifest and manifest["checksum"] != manifest_checksum(manifest):  # older sets have none
        raise ShardError(f"{path}: the manifest was edited after it was written (its checksum does not match its content)")
    files, counts = manifest.get("files", []), manifest.get("counts", {})
    for key, column in (("rows_written", "rows"), ("response_tokens", "tokens")):
        listed = sum(f.get(column, 0) for f in files)
        if key in counts and counts[key] != listed:
            raise ShardError(f"{path}: counts.{key} is {counts[key]} but its files add up to {listed} "
                             "(a file entry was removed or a count edited)")
    return manifest


def read_manifests(root: AnyPath) -> list[dict]:
    """The manifests of a finished set, in worker order: every worker's present, each loaded
    (`load_manifest`) and all run with the same settings (`SHARED_KEYS`)."""
    if not root.is_dir():
        raise ShardError(f"{root}: no such shard directory")
    single = root / "manifest.json"
    paths = sorted(root.glob("manifest-*-of-*.json"))
    if single.exists() and paths:
        raise ShardError(
            f"{root}: holds both manifest.json (one worker) and worker manifests ({paths[0].name}, ...): two runs "
            "with different num_workers wrote here; rerun phase one with --overwrite true, or use another directory"
        )
    if single.exists():
        return [load_manifest(single)]
    if not paths:
        raise ShardError(
            f"{root}: no manifest.json or worker manifests: not a shard set, or phase one has "
            "not finished (rerun the same wspo-precompute command to resume)"
        )
    manifests = [load_manifest(p) for p in paths]
    total = manifests[0]["workers"]["num_workers"]
    have = {m["workers"]["worker_index"]: p for m, p in zip(manifests, paths)}
    missing = sorted(set(range(total)) - set(have))
    if missing:
        names = ", ".join(manifest_name(total, i) for i in missing)
        raise ShardError(f"{root}: worker manifests missing ({len(missing)} of {total}): {names}")
    for m, p in zip(manifests, paths):
        if m["workers"]["num_workers"] != total:
            raise ShardError(f"{p}: num_workers {m['workers']['num_workers']} differs from {paths[0].name} ({total})")
        for key in SHARED_KEYS:
            if m.get(key) != manifests[0].get(key):
                raise ShardError(f"{p}: '{key}' differs from {paths[0].name}: the workers ran different settings")
    manifests.sort(key=lambda m: m["workers"]["worker_index"])
    return manifests

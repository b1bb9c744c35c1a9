"""Shared fixtures: tiny local models built once per test session (no model hub)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'tokenizer', 'weak_ref', 'weak_aligned'} -> directories of tiny Qwen2 models (fp32)."""
    from wspo.embedded.models import build_weak_pair

    return build_weak_pair(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3 endpoint on localhost (moto's server, the one s3fs's own tests use) with an empty
    bucket; the AWS variables point every process of the tests at it (subprocesses inherit them).
    Yields the bucket's URL, `s3://wspo-test`; the server is stopped after the session."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"moto_server did not start on {endpoint} (is moto[server] installed?)")
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
                patch.setenv(key, value)
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                patch.delenv(key, raising=False)
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem(use_listings_cache=False).mkdir("wspo-test")
            yield "s3://wspo-test"
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.terminate()
        server.wait(timeout=30)

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
    """A real S3 endpoint on localhost (moto's server, tests/s3_endpoint.py) with an empty bucket;
    the AWS variables point every process of the tests at it (subprocesses inherit them). Yields
    the bucket's URL, `s3://wspo-test`; the server is stopped after the session."""
    import s3fs
    from s3_endpoint import moto_endpoint, s3_environment

    with moto_endpoint() as endpoint, pytest.MonkeyPatch.context() as patch:
        for key, value in s3_environment(endpoint).items():
            patch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(key, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(use_listings_cache=False).mkdir("wspo-test")
        yield "s3://wspo-test"
        s3fs.S3FileSystem.clear_instance_cache()

"""A real S3 API for tests: moto's server on 127.0.0.1 at an ephemeral port, started and stopped by
the caller, with the standard AWS environment variables pointing at it."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


@contextmanager
def s3_server(bucket: str | None = None) -> Iterator[str]:
    """Run moto's S3 server on loopback for the ``with`` block and yield ``s3://<bucket>``.

    The AWS variables are set in this process for the block (and restored after), so pyarrow,
    boto3 and a Ray instance started inside the block all reach the server. A Ray instance started
    before the block does not see them: start it inside."""
    import boto3
    from moto.server import ThreadedMotoServer

    from capfilt.core import fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in _ENV}
    try:
        host, port = server.get_host_and_port()
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://{host}:{port}",
            AWS_ACCESS_KEY_ID="capfilt-test",
            AWS_SECRET_ACCESS_KEY="capfilt-test",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1",
        )
        fs._filesystem.cache_clear()  # filesystems made for an earlier server point elsewhere
        name = bucket or f"capfilt-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=name)
        yield f"s3://{name}"
    finally:
        server.stop()
        fs._filesystem.cache_clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

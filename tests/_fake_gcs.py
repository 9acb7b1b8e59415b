"""A fake GCS endpoint for tests of `gs://` run directories: gcp-storage-emulator, in-process,
speaking the GCS JSON API, with gcsfs (files) and tensorstore (orbax's arrays) pointed at it
by their documented endpoint variables (subprocesses started inside inherit them)."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def fake_gcs(bucket: str) -> Iterator[str]:
    """Serve one in-memory bucket; yields `gs://BUCKET` (skips without the emulator)."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    gcsfs = pytest.importorskip("gcsfs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    url = f"http://127.0.0.1:{port}"
    logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "no default credentials" notices
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs
            mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore (orbax's array writes)
            mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake")  # tensorstore: no credentials
            gcsfs.GCSFileSystem.clear_instance_cache()
            yield f"gs://{bucket}"
            gcsfs.GCSFileSystem.clear_instance_cache()
    finally:
        server.stop()

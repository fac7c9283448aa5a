"""A local Google Cloud Storage emulator for tests (PyPI ``gcp-storage-emulator``), in its own process.

``start()`` returns the emulator and the environment that points every client at it: fsspec/gcsfs
(what :mod:`flexmoe_jax.storage` uses for ``gs://``) through ``STORAGE_EMULATOR_HOST``, TensorStore
(Orbax's arrays) through ``TENSORSTORE_GCS_HTTP_URL`` with a fixed test token. gcsfs's storage-layout
lookup (a gRPC control-plane call the emulator does not serve) is switched off.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

BUCKET = "flexmoe-test"


class Emulator:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url
        self.env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "EPATH_USE_TF": "false",
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def available() -> bool:
    try:
        import gcp_storage_emulator  # noqa: F401
        import gcsfs  # noqa: F401
    except ImportError:
        return False
    return True


def start(timeout: float = 30.0) -> Emulator:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # gcs_emulator_server.py: the emulator plus the generation headers and preconditions TensorStore needs.
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator_server.py"),
           "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", BUCKET]
    log = open(os.environ.get("FLEXMOE_GCS_EMULATOR_LOG", os.devnull), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the GCS emulator exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return Emulator(proc, f"http://127.0.0.1:{port}")
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the GCS emulator did not start within {timeout:.0f} s")

"""Runs ``gcp-storage-emulator`` with the parts of GCS that TensorStore relies on and it lacks.

TensorStore (Orbax's array I/O) keeps OCDBT manifests consistent with GCS generations: it reads an
object's ``x-goog-generation`` header and makes writes and reads conditional (``ifGenerationMatch``,
``ifGenerationNotMatch``). The emulator (2026.7) sends no generation header on downloads and ignores the
conditions, and serves one request at a time. Here, before its server module is imported:

- downloads carry ``x-goog-generation`` / ``x-goog-metageneration``;
- ``ifGenerationMatch`` (412 when it fails, 0 = "must not exist") on uploads, downloads and metadata
  reads, and ``ifGenerationNotMatch`` (304) on downloads and metadata reads, checked and applied
  under one lock so a conditional write is atomic, as on GCS;
- the HTTP server is threaded.

Usage: ``python tests/gcs_emulator_server.py start --port P --in-memory --default-bucket B``.
"""

import sys
import threading
from http import HTTPStatus, server

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.RLock()


def _current_generation(storage, bucket: str, name: str):
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _failed_precondition(request, response, storage, name: str) -> bool:
    """Apply GCS's generation preconditions; True (status set) when the request must not proceed."""
    match = request.query.get("ifGenerationMatch")
    not_match = request.query.get("ifGenerationNotMatch")
    if not match and not not_match:
        return False
    current = _current_generation(storage, request.params["bucket_name"], name)
    if match and match[0] != current:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return True
    if not_match and not_match[0] == current and current != "0":
        response.status = HTTPStatus.NOT_MODIFIED
        return True
    return False


def _with_generation_headers(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        with _LOCK:
            name = request.params.get("object_id")
            if name is not None and _failed_precondition(request, response, storage, name):
                return None
            out = handler(request, response, storage, *args, **kwargs)
            if name is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
                try:
                    obj = storage.get_file_obj(request.params["bucket_name"], name)
                    response["x-goog-generation"] = str(obj["generation"])
                    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
                except NotFound:
                    pass
            return out
    return wrapped


def _conditional_insert(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        with _LOCK:
            name = request.query.get("name")
            if name and _failed_precondition(request, response, storage, name[0]):
                return None
            return handler(request, response, storage, *args, **kwargs)
    return wrapped


def _locked(handler):
    def wrapped(*args, **kwargs):
        with _LOCK:
            return handler(*args, **kwargs)
    return wrapped


objects.download = _with_generation_headers(objects.download)
objects.get = _with_generation_headers(objects.get)
objects.insert = _conditional_insert(objects.insert)
objects.delete = _locked(objects.delete)
server.HTTPServer = server.ThreadingHTTPServer

from gcp_storage_emulator.__main__ import main  # noqa: E402 - after the patches, which its server module reads

if __name__ == "__main__":
    main(sys.argv[1:])

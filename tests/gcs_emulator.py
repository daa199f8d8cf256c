"""Run gcp-storage-emulator with one fidelity fix: real GCS answers an object download with an
`x-goog-generation` header, the emulator does not. TensorStore (Orbax's array writer) takes the
generation of what it read from that header for OCDBT's conditional manifest writes; without it,
about one checkpoint save in fifteen failed with "Malformed StorageGeneration".

    python tests/gcs_emulator.py start --host 127.0.0.1 --port P --in-memory --default-bucket B
"""

import functools

from gcp_storage_emulator.handlers import objects


def _with_generation(download):
    @functools.wraps(download)
    def wrapped(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the handler already answered 404
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    return wrapped


objects.download = _with_generation(objects.download)  # before the server module binds its routes

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    main()

"""One small storage interface for model download, checkpoints and the published output (DESIGN §5).

:func:`open_store` returns a :class:`Store` rooted at a URI's prefix, chosen by the
URI's scheme in :mod:`~kubetune_trainer.storage.registry`.  The package:

* :mod:`.base` — the :class:`Store`/:class:`Upload` protocols, :class:`ObjectInfo`, the errors;
* :mod:`.retry` — the one retry loop (backoff with jitter, then :class:`StorageUnavailable`);
* :mod:`.s3` — S3 and S3-compatible stores; :mod:`.local` — ``file://``, ``pvc://`` and plain paths;
* :mod:`.fsync` — durable local writes; :mod:`.uris` — schemes, local paths and the PVC root;
* :mod:`.registry` — scheme → backend, :func:`open_store` and :func:`register_scheme`.

:meth:`Store.open_upload` starts a batch of uploads to which files can be added
while earlier ones transfer: the checkpoint manager adds each file the moment
DeepSpeed has written it.  ``upload_dir`` is the same batch for a finished folder.
"""

from kubetune_trainer.storage.base import (
    ObjectInfo,
    StorageError,
    StorageUnavailable,
    Store,
    Upload,
    total_size,
    upload_tree,
)
from kubetune_trainer.storage.fsync import fsync_path
from kubetune_trainer.storage.local import LocalStore
from kubetune_trainer.storage.registry import (
    Opener,
    StoreOptions,
    open_store,
    register_scheme,
    schemes,
    unregister_scheme,
)
from kubetune_trainer.storage.retry import RetryPolicy, with_retries
from kubetune_trainer.storage.s3 import S3Store
from kubetune_trainer.storage.uris import local_path, pvc_root, scheme_of

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "Opener",
    "RetryPolicy",
    "S3Store",
    "StorageError",
    "StorageUnavailable",
    "Store",
    "StoreOptions",
    "Upload",
    "fsync_path",
    "local_path",
    "open_store",
    "pvc_root",
    "register_scheme",
    "scheme_of",
    "schemes",
    "total_size",
    "unregister_scheme",
    "upload_tree",
    "with_retries",
]

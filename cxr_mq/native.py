"""Load TenSEAL's extension modules so that TensorFlow cannot break them.

Why: TenSEAL's ``_tenseal_cpp`` and ``_sealapi_cpp`` carry their own statically linked
protobuf and zstd with default symbol visibility, and TensorFlow's import loads
``_pywrap_tensorflow_internal.so`` with ``RTLD_GLOBAL`` (``pywrap_dlopen_global_flags``),
which puts TensorFlow's (different) protobuf and zstd into the process-wide symbol scope. An
extension loaded after that binds ~2,000 of its own symbols to TensorFlow's copies (ELF
interposition; ``LD_DEBUG=bindings`` shows them), and the first ``context.serialize()`` dies
in ``google::protobuf::MessageLite::SerializePartialToArray`` inside
``libtensorflow_framework.so.2``. Loaded before TensorFlow, TenSEAL had already bound its
symbols to itself (``RTLD_NOW``), which is why the order mattered.

The fix at the root: load both extensions with ``RTLD_DEEPBIND``, so each resolves its
symbols in itself before the global scope, whichever library came first. Once they sit in
``sys.modules``, every later ``import tenseal`` (ours, a test's, a notebook's) reuses them.
``cxr_mq/__init__.py`` calls :func:`load_tenseal` so that this happens before any code of the
package (or of ``workers``) can import TensorFlow. What it cannot repair: a process that
imported TensorFlow and then TenSEAL itself before importing ``cxr_mq``.
"""

from __future__ import annotations

import importlib
import os
import sys

_EXTENSIONS = ("_tenseal_cpp", "_sealapi_cpp")


def load_tenseal() -> None:
    """Import TenSEAL's extension modules with ``RTLD_DEEPBIND`` (idempotent, ~10 ms)."""
    missing = [name for name in _EXTENSIONS if name not in sys.modules]
    if not missing:
        return
    deepbind = getattr(os, "RTLD_DEEPBIND", 0)  # glibc only; elsewhere nothing to fix
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | deepbind | os.RTLD_NOW)
    try:
        for name in missing:
            try:
                importlib.import_module(name)
            except ImportError:
                pass  # not installed: nothing to guard, and ``import tenseal`` will say so
    finally:
        sys.setdlopenflags(flags)

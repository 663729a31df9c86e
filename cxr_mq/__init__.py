"""cxr-mq: federated chest X-ray learning with CKKS-encrypted updates over RabbitMQ and S3."""

from cxr_mq.native import load_tenseal as _load_tenseal

# The one import-time action of the package, on purpose: TenSEAL's extensions must be loaded
# with RTLD_DEEPBIND before anything imports TensorFlow, or TenSEAL's serialization crashes
# (see cxr_mq/native.py). Every module of cxr_mq and workers passes through here first.
_load_tenseal()

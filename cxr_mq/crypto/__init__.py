"""CKKS codec: encrypt model updates at the hospital, add them at the aggregator.

A hospital encrypts ``n_samples * weights`` (pre-scaling by its sample count means the
aggregator only ever adds ciphertexts: no multiplication, no relinearization, no rescaling);
the aggregator adds ciphertexts holding only the public context; a holder of the secret key
decrypts the sum and divides by the total sample count (FedAvg).

Profiles (``seed``, ``compact``) are separate classes behind one interface; the profile and
its parameters are part of the key fingerprint, so a ciphertext of another profile or key is
rejected before anything is added.

Layers, each a module that reads alone (lower ones never import higher ones):

- ``errors``: the exceptions.
- ``wire``: the byte formats (stream header and frames, limits, key files, word packing).
- ``sampling``: AES-CTR keystreams, seed expansion, centered binomial noise.
- ``sealio``: SEAL glue (scratch files, serialization headers, the plaintext loader, the
  security check).
- ``base``: the ``CkksCodec`` / ``EncryptedSum`` interface and the checks profiles share.
- ``seed``, ``compact`` (with ``pool``, its process pool): the profiles.
- ``keys``: key pairs, the profile registry, loading a context.
- ``threshold`` (no shared key; see ``docs/security.md``), built on ``ring`` (Z_q[X]/(X^N+1)
  in numpy: NTT, RNS, sampling), ``keylayer`` (collective public key, key ciphertexts),
  ``ceremony`` (t-of-n Shamir-shared collective secret, shares sealed to X25519 identities)
  and ``committee`` (checked partial decryption of a round's key sum, combination).
"""

from .base import DEFAULT_MAX_CONTRIBUTORS, CkksCodec, EncryptedSum
from .compact import CompactCodec, CompactSum
from .errors import CodecError, CodecMismatch, SecretKeyPresent, UpdateOutOfRange
from .keys import DEFAULT_PROFILE, PROFILES, SINGLE_KEY_PROFILES, KeyPair, generate_keys, load_context, load_context_file
from .seed import SeedCodec, SeedSum
from .threshold import RoundEncoding, ThresholdCodec, ThresholdSum
from .wire import (
    FORMAT_VERSION,
    KEY_MAGIC,
    MAX_CHUNK_BYTES,
    MAX_CONTRIBUTORS,
    MAX_HEADER_BYTES,
    MAX_PARAMS,
    MAX_UPDATES,
    UPDATE_MAGIC,
    UpdateHeader,
)

__all__ = [
    "CodecError",
    "CodecMismatch",
    "SecretKeyPresent",
    "UpdateOutOfRange",
    "KeyPair",
    "UpdateHeader",
    "CkksCodec",
    "EncryptedSum",
    "SeedCodec",
    "SeedSum",
    "CompactCodec",
    "CompactSum",
    "ThresholdCodec",
    "ThresholdSum",
    "RoundEncoding",
    "generate_keys",
    "load_context",
    "load_context_file",
    "DEFAULT_PROFILE",
    "PROFILES",
    "SINGLE_KEY_PROFILES",
    "FORMAT_VERSION",
    "KEY_MAGIC",
    "UPDATE_MAGIC",
    "MAX_CHUNK_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_PARAMS",
    "MAX_UPDATES",
    "MAX_CONTRIBUTORS",
    "DEFAULT_MAX_CONTRIBUTORS",
]

"""The ``seed`` profile: the original parameters through TenSEAL's CKKSVector."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from .base import DEFAULT_MAX_CONTRIBUTORS, CkksCodec, EncryptedSum, as_weights, check_contributors, check_samples, fingerprint_of
from .errors import CodecError, CodecMismatch
from .sealio import check_security, seal_save
from .wire import UpdateHeader, pack_key, read_frame, write_frame, write_header

class SeedCodec(CkksCodec):
    """The seed's parameters through TenSEAL's CKKSVector: the compatibility baseline.

    N=8192, coefficient moduli [60, 40, 40, 60], scale 2^40, 4096 real slots per ciphertext,
    public-key encryption. A fresh ciphertext lives at the top level (140 data bits), so
    |n_samples * w| * 2^40 has ~2^99 of headroom: no pre-scaling is needed (sample counts of
    1e5 and weights of 10 use 2^60).

    Limits (see ``base``): an update takes at most 2^24 per parameter (as ``compact``);
    one encryption's noise stays below 2^-24 in value units (measured: 7e-9 per update, 6e-8
    for 16 updates at 2^24), so the grid is 2^-22 for one update, 2^-19 for 16.
    """

    profile = "seed"
    POLY_MODULUS_DEGREE = 8192
    COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
    SCALE_BITS = 40
    SLOTS = 4096
    MAX_FRAME_BYTES = 1 << 20  # a serialized CKKSVector of 4096 slots: ~400 KB
    noise_bound = 2.0**-24
    decode_slack = 2.0**-24
    sum_limit = 2.0**90  # the data modulus is at least 2^137 and the scale 2^40
    value_cap = 2.0**24

    @classmethod
    def params(cls) -> dict:
        return {
            "poly_modulus_degree": cls.POLY_MODULUS_DEGREE,
            "coeff_mod_bit_sizes": list(cls.COEFF_MOD_BIT_SIZES),
            "scale_bits": cls.SCALE_BITS,
            "slots": cls.SLOTS,
        }

    def __init__(self, context):
        import tenseal as ts

        self._ts = ts
        self._ctx = context
        self._ctx.global_scale = 2.0**self.SCALE_BITS
        check_security(self.POLY_MODULUS_DEGREE, self.COEFF_MOD_BIT_SIZES)
        self.has_secret_key = bool(context.is_private())
        self.fingerprint = fingerprint_of(self.profile, self.params(), seal_save(context.public_key().data))

    @classmethod
    def generate(cls) -> "SeedCodec":
        import tenseal as ts

        check_security(cls.POLY_MODULUS_DEGREE, cls.COEFF_MOD_BIT_SIZES)
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=cls.POLY_MODULUS_DEGREE,
            coeff_mod_bit_sizes=list(cls.COEFF_MOD_BIT_SIZES),
        )
        return cls(ctx)

    @classmethod
    def from_payload(cls, payload: dict) -> "SeedCodec":
        import tenseal as ts

        if payload.get("params") != cls.params():
            raise CodecMismatch(f"seed parameters differ: file {payload.get('params')}, codec {cls.params()}")
        try:
            ctx = ts.context_from(payload["context"])
        except Exception as exc:
            raise CodecError(f"unreadable TenSEAL context: {exc}") from exc
        return cls(ctx)

    def _payload(self, secret: bool) -> dict:
        if secret:
            self._require_secret()
            ctx = self._ctx
        else:
            ctx = self._ctx.copy()
            if ctx.is_private():
                ctx.make_context_public()
        data = ctx.serialize(save_public_key=True, save_secret_key=secret, save_galois_keys=False, save_relin_keys=False)
        return {"profile": self.profile, "params": self.params(), "context": data}

    def secret_bytes(self) -> bytes:
        return pack_key(self._payload(secret=True))

    def public_bytes(self) -> bytes:
        return pack_key(self._payload(secret=False))

    def n_chunks(self, n_params: int) -> int:
        return -(-int(n_params) // self.SLOTS)

    def encrypt_update(self, weights: np.ndarray, n_samples: int, out: BinaryIO, *,
                       max_contributors: int | None = None) -> int:
        check_samples(n_samples, "n_samples")
        k = check_contributors(DEFAULT_MAX_CONTRIBUTORS if max_contributors is None else max_contributors)
        scaled = as_weights(weights) * float(n_samples)
        self.check_update_range(float(np.max(np.abs(scaled))), k)
        grid = self.grid(k)
        scaled = np.rint(scaled / grid) * grid
        header = UpdateHeader(self.profile, self.fingerprint, scaled.size, self.n_chunks(scaled.size))
        written = write_header(out, header)
        for start in range(0, scaled.size, self.SLOTS):
            vec = self._ts.ckks_vector(self._ctx, scaled[start : start + self.SLOTS].tolist())
            written += write_frame(out, vec.serialize())
        return written

    def new_sum(self, n_params: int, *, max_updates: int | None = None,
                distinct_updates: bool = True) -> "SeedSum":
        return SeedSum(self, n_params, max_updates, distinct_updates)

    def _load_chunk(self, blob: bytes, index: int, n_params: int):
        try:
            vec = self._ts.ckks_vector_from(self._ctx, blob)
        except Exception as exc:
            raise CodecError(f"chunk {index}: unreadable ciphertext: {exc}") from exc
        expected = min(self.SLOTS, n_params - index * self.SLOTS)
        if vec.size() != expected:
            raise CodecError(f"chunk {index}: {vec.size()} values, expected {expected}")
        return vec

    def _decrypt_chunks(self, src: BinaryIO, header: UpdateHeader) -> np.ndarray:
        total = np.empty(header.n_params, dtype=np.float64)
        for i in range(header.n_chunks):
            vec = self._load_chunk(read_frame(src, f"chunk {i}", self.MAX_FRAME_BYTES), i, header.n_params)
            start = i * self.SLOTS
            total[start : start + vec.size()] = vec.decrypt()
        return total


class SeedSum(EncryptedSum):
    codec: SeedCodec

    def __init__(self, codec: SeedCodec, n_params: int, max_updates: int | None = None,
                 distinct_updates: bool = True):
        super().__init__(codec, n_params, max_updates, distinct_updates)
        self._chunks: list = [None] * self.n_chunks

    def _stage(self, src: BinaryIO, header: UpdateHeader) -> list:
        staged = []
        for i in range(self.n_chunks):
            vec = self.codec._load_chunk(read_frame(src, f"chunk {i}", self.codec.MAX_FRAME_BYTES), i, self.n_params)
            try:
                staged.append(vec if self._chunks[i] is None else self._chunks[i] + vec)
            except Exception as exc:  # scale or parameter mismatch inside SEAL
                raise CodecError(f"chunk {i}: cannot add: {exc}") from exc
        return staged

    def _commit(self, staged: list, header: UpdateHeader) -> None:
        self._chunks = staged

    def _chunk_blobs(self):
        for vec in self._chunks:
            yield vec.serialize()

"""The ``compact`` profile: seeded symmetric CKKS over one 56-bit prime, ~7 bytes/param."""

from __future__ import annotations

import io
import math
import os
import struct
import threading
import weakref
from typing import BinaryIO

import numpy as np

from .base import DEFAULT_MAX_CONTRIBUTORS, CkksCodec, EncryptedSum, as_weights, check_contributors, check_samples, fingerprint_of
from .errors import CodecError, CodecMismatch
from .pool import available_cores, pool_decrypt, pool_encrypt, pool_init, pool_ping, shared_file
from .sampling import aes_ctr, expand_seed
from .sealio import SEAL_HEADER, SEAL_MAGIC, SEAL_ZSTD, PlainLoader, Scratch, check_security, seal_blob
from .wire import MAX_CHUNK_BYTES, U32, UpdateHeader, pack_key, pack_words, read_into, strided_words, unpack_words, write_frame, write_header

class CompactCodec(CkksCodec):
    """Seeded symmetric CKKS over one 56-bit prime, coefficient-packed: ~7 bytes per parameter.

    - One prime, no special prime: the aggregator only adds, so there is no key switching,
      no relinearization and no rescaling; SEAL allows this and it checks 128-bit security.
    - N parameters per ciphertext, as polynomial *coefficients* (round(value * 2^28) mod q;
      the decoder fills the slots with the canonical embedding). Decryption noise then stays
      per coefficient, bounded by the centered binomial sampler (|e| <= 21) instead of
      growing with sqrt(N) in the slots.
    - Seeded symmetric RLWE encryption, computed by SEAL: a chunk's uniform polynomial
      ``u`` is expanded from a fresh 32-byte seed (AES-256-CTR, rejection-sampled modulo q,
      ``expand_seed``); the hospital loads ``(m + e, u)`` as a coefficient-form ciphertext,
      SEAL transforms it to NTT form and its Decryptor, holding the real secret key,
      computes ``c0 = NTT(m + e) + NTT(u) * s``. The ciphertext is ``(c0, -NTT(u))``: it
      decrypts to ``m + e``, with ``-NTT(u)`` uniform as RLWE requires. ``e`` is SEAL's
      noise distribution (centered binomial, 21 + 21 bits, sigma 3.2) drawn from a
      CSPRNG; the secret key never leaves SEAL. A chunk on the wire is the seed (with a
      one-byte PRNG tag) and ``c0`` (NTT form) packed to 7 bytes per coefficient.
    - The aggregator adds the ``c0`` halves modulo q in numpy and keeps the seeds (33 bytes
      per chunk per update). Whoever decrypts expands the seeds, sums them modulo q
      (NTT is linear: one NTT for the sum, not one per update) and decrypts through SEAL.
      The aggregate is the same format with one seed per summed update in every chunk.
    - Hospitals encrypt and decrypt large models on a process pool (``workers``, default
      every core); a codec may be shared by threads, an EncryptedSum may not.

    Limits and precision (coefficient encoding, scale 2^28; see ``base``): a decrypted
    coefficient is exact while |sum| < (q - 1) / 2 (about 2^27 = 1.3e8 in value units).
    One encryption adds noise of at most 21 units; decoding adds at most ``DECODE_SLACK``
    (measured: below 13 units together with the noise at 2^52). A round of at most K
    contributors takes updates up to ``update_limit(K)`` = min(2^24, ~2^27 / K) (K = 10:
    1.3e7; K = 200: 6.7e5) and quantizes them to ``grid(K)``, a power of two above twice the
    sum's noise (``noise_of_sum``) plus ``DECODE_SLACK``: 2^-20 for K <= 3, 2^-19 for K <= 31,
    2^-18 for K <= 170, 2^-17 for K <= 781 (value units). Each update is off by at most
    ``precision(K)`` = grid(K) / 2; a FedAvg value by at most k * precision(K) / total
    samples (K = 10 and 100 samples per hospital: 9.5e-9; one sample each: 9.5e-7).
    """

    profile = "compact"
    POLY_MODULUS_DEGREE = 8192
    PRIME_BITS = 56
    SCALE_BITS = 28
    PACKED_BYTES = PRIME_BITS // 8
    PRNG_TAG = 0xA5  # AES-256-CTR, 7-byte little-endian words, rejection modulo q
    SEED_BYTES = 1 + 32  # the tag and the AES-256 key
    NOISE_BITS = 21  # centered binomial: popcount of 21 bits minus popcount of 21 (SEAL's)
    NOISE_BOUND = NOISE_BITS
    VALUE_LIMIT = 2.0**24  # per update, whatever the round: |values * factor| < 2^52 in residues()
    DECODE_SLACK = 64  # units of the scale: floating-point error of decoding a sum near q / 2
    MAX_FRAME_BYTES = 1 << 26  # a chunk frame of a sum; the exact size is checked per stream
    READ_BATCH = 16  # chunks per read and per vectorized add on the aggregator
    ENCRYPT_BATCH = 8  # chunks computed in SEAL before they are serialized (see encrypt_chunks)
    TASK_CHUNKS = 32  # chunks per task of the hospital's process pool
    TASKS_PER_WORKER = 8  # per update, at least (a finer split idles less at the end)
    parallel_min_params = 1 << 21  # below this a process pool costs more than it saves

    def __init__(self, public_key: bytes, secret_key: bytes | None = None, *, claimed_params: dict | None = None):
        import tenseal.sealapi as seal

        self._seal = seal
        self._context, self.q = self._make_context()
        if claimed_params is not None and claimed_params != self.params():
            raise CodecMismatch(f"compact parameters differ: context {claimed_params}, this codec {self.params()}")
        self.scale = 2.0**self.SCALE_BITS
        self.noise_bound = self.NOISE_BOUND / self.scale
        self.decode_slack = self.DECODE_SLACK / self.scale
        self.sum_limit = ((self.q - 1) // 2) / self.scale
        self.value_cap = self.VALUE_LIMIT
        self.fingerprint = fingerprint_of(self.profile, self.params(), public_key)
        self.has_secret_key = secret_key is not None
        self.workers = available_cores()
        self._public_key = public_key
        self._secret_key = secret_key
        self._executor = None
        self._local = threading.local()  # SEAL's path-based I/O needs a scratch file per thread
        if secret_key is not None:
            self._init_secret(secret_key)

    def params(self) -> dict:
        return {
            "poly_modulus_degree": self.POLY_MODULUS_DEGREE,
            "coeff_modulus": [self.q],
            "scale_bits": self.SCALE_BITS,
            "encoding": "coefficients",
            "encryption": "symmetric-seeded",
            "seed_expansion": "aes-256-ctr",
            "noise": f"cbd-{self.NOISE_BITS}",
            "packed_bytes": self.PACKED_BYTES,
        }

    # keys

    @classmethod
    def _make_context(cls):
        """The SEAL context of this profile, its security checked; and its prime."""
        import tenseal.sealapi as seal

        n = cls.POLY_MODULUS_DEGREE
        check_security(n, [cls.PRIME_BITS])
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(n)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(n, [cls.PRIME_BITS]))
        context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not context.parameters_set():
            raise CodecError(f"SEAL refuses the compact parameters: {context.parameters_error_message()}")
        return context, int(parms.coeff_modulus()[0].value())

    @classmethod
    def generate(cls) -> "CompactCodec":
        import tenseal.sealapi as seal

        context, _ = cls._make_context()
        keygen = seal.KeyGenerator(context)
        public = seal.PublicKey()
        keygen.create_public_key(public)
        scratch = Scratch()
        return cls(scratch.save(public), scratch.save(keygen.secret_key()))

    @classmethod
    def from_payload(cls, payload: dict) -> "CompactCodec":
        try:
            public_key = bytes(payload["public_key"])
            secret_key = payload.get("secret_key")
            claimed = payload["params"]
        except (KeyError, TypeError) as exc:
            raise CodecError(f"incomplete compact context: {exc}") from exc
        return cls(public_key, None if secret_key is None else bytes(secret_key), claimed_params=claimed)

    def _payload(self, secret: bool) -> dict:
        payload = {"profile": self.profile, "params": self.params(), "public_key": self._public_key}
        if secret:
            self._require_secret()
            payload["secret_key"] = self._secret_key
        return payload

    def secret_bytes(self) -> bytes:
        return pack_key(self._payload(secret=True))

    def public_bytes(self) -> bytes:
        return pack_key(self._payload(secret=False))

    @property
    def _scratch(self) -> Scratch:
        local = self._local
        if not hasattr(local, "scratch"):
            local.scratch = Scratch()
        return local.scratch

    @property
    def _zstd(self):
        local = self._local
        if not hasattr(local, "zstd"):
            import zstandard

            local.zstd = zstandard.ZstdDecompressor()
        return local.zstd

    @property
    def _plain_loader(self) -> "PlainLoader":
        local = self._local
        if not hasattr(local, "plain_loader"):
            local.plain_loader = PlainLoader(self._plain_template, self._plain_at, self.POLY_MODULUS_DEGREE, self.q)
        return local.plain_loader

    def _init_secret(self, secret_key: bytes) -> None:
        seal, n = self._seal, self.POLY_MODULUS_DEGREE
        try:
            self._sk = seal.SecretKey()
            self._scratch.load(self._sk, self._context, secret_key)
            pk = seal.PublicKey()
            self._scratch.load(pk, self._context, self._public_key)
        except RuntimeError as exc:
            raise CodecError(f"unreadable compact key: {exc}") from exc
        self._encoder = seal.CKKSEncoder(self._context)
        self._decryptor = seal.Decryptor(self._context, self._sk)
        self._evaluator = seal.Evaluator(self._context)
        # SEAL's slot i holds m(zeta^p), p = 3^i mod 2N, zeta = exp(i pi / N). A half-size FFT of
        # the folded, twisted coefficients gives m at every zeta^(4j+1); the slots with
        # p = 3 mod 4 are the conjugates of m at zeta^(2N-p), which is 1 mod 4.
        half = n // 2
        powers = np.empty(half, dtype=np.int64)
        pos = 1
        for i in range(half):
            powers[i] = pos
            pos = pos * 3 % (2 * n)
        self._conj_slots = powers % 4 == 3
        self._fold_index = np.where(self._conj_slots, (2 * n - powers - 1) // 4, (powers - 1) // 4)
        self._twist = np.exp(1j * np.pi * np.arange(half) / n)
        self._init_paths()
        # the public key must belong to the secret key: encrypt 0 with one, decrypt with the other
        probe = seal.Ciphertext()
        seal.Encryptor(self._context, pk).encrypt(self._encode(np.zeros(n)), probe)
        plain = seal.Plaintext()
        self._decryptor.decrypt(probe, plain)
        if np.max(np.abs(self._encoder.decode_double(plain))) > 1e-2:
            raise CodecError("the compact context's public key does not match its secret key")

    def _init_paths(self) -> None:
        """Learn SEAL's serializations this codec reads and writes, build the templates it
        loads, and check the whole path once: encrypt a probe, decrypt it, compare.

        - An NTT-form plaintext (SEAL 4.x ``Plaintext::save_members``): parms_id, coefficient
          count, scale, then a DynArray (header, count, coefficients). Decryption writes one
          (the hospital reads ``c0`` out of it); the decryptor loads one (``c0`` of a sum).
        - A coefficient-form ciphertext of two polynomials (``Ciphertext::save_members``:
          parms_id, NTT flag, size, N, number of primes, scale, correction factor, DynArray),
          loaded through a memfd of which only the polynomials are rewritten (``PlainLoader``).
        Anything unexpected fails loudly here, naming the TenSEAL version as the likely cause.
        """
        n = self.POLY_MODULUS_DEGREE
        saved = self._scratch.save(self._encode(np.zeros(n)))
        version = SEAL_HEADER.unpack_from(saved)[2:4]
        raw = self._decompress_seal(saved, 1 << 20)
        dyn_at = 32 + 8 + 8
        try:
            coeff_count, scale = struct.unpack_from("<Qd", raw, 32)
            dyn = SEAL_HEADER.unpack_from(raw, dyn_at)
            (count,) = struct.unpack_from("<Q", raw, dyn_at + SEAL_HEADER.size)
            ok = (
                (coeff_count, scale, count) == (n, self.scale, n)
                and dyn[0] == SEAL_MAGIC and dyn[4] == 0 and dyn[6] == SEAL_HEADER.size + 8 + 8 * n
                and len(raw) == dyn_at + SEAL_HEADER.size + 8 + 8 * n
            )
        except struct.error:
            ok = False
        if not ok:
            raise CodecError("unexpected SEAL plaintext layout: is this the TenSEAL version cxr-mq expects?")
        self._seal_version = version
        self._plain_prefix = raw[: -8 * n]
        parms_id = raw[:32]
        fields = struct.pack("<BQQQdQ", 0, 2, n, 1, self.scale, 1)
        dyn = SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER.size, *version, 0, 0, SEAL_HEADER.size + 8 + 16 * n)
        body = parms_id + fields + dyn + struct.pack("<Q", 2 * n) + bytes(16 * n)
        self._plain_template = seal_blob(version, body)
        self._plain_at = len(self._plain_template) - 16 * n
        self._zero_row = np.zeros(n, dtype=np.uint64)
        # the check: integer coefficients (exact under encoding) through encryption, a sum of
        # two updates and decryption, within the noise bound
        rng = np.random.default_rng(0x5EA1)
        probe = rng.integers(-(1 << 40), 1 << 40, (2, n)).astype(np.float64)
        rows = [self.encrypt_chunks(row, 1.0 / self.scale)[0] for row in probe]
        k = 2
        seeds = b"".join(sorted(r[: self.SEED_BYTES] for r in rows))
        words = [unpack_words(r[self.SEED_BYTES :], self.PACKED_BYTES) for r in rows]
        total = (words[0] + words[1]) % np.uint64(self.q)
        got = self._decrypt_chunk(total, seeds, k) * self.scale
        if np.max(np.abs(got - probe.sum(axis=0))) > k * (self.NOISE_BOUND + 1):
            raise CodecError("the compact encryption path does not decrypt: is this the TenSEAL version cxr-mq expects?")

    @property
    def _word_mask(self) -> np.uint64:
        return np.uint64((1 << (8 * self.PACKED_BYTES)) - 1)

    def _plain_words(self, plain) -> np.ndarray:
        """The coefficients (uint64) of an NTT-form plaintext, through SEAL's serialization."""
        n = self.POLY_MODULUS_DEGREE
        raw = self._decompress_seal(self._scratch.save(plain), len(self._plain_prefix) + 8 * n)
        if len(raw) != len(self._plain_prefix) + 8 * n or raw[: -8 * n] != self._plain_prefix:
            raise CodecError("SEAL wrote an unexpected plaintext layout")
        return np.frombuffer(raw, dtype="<u8", count=n, offset=len(self._plain_prefix))

    def _load_plain(self, words: np.ndarray):
        """An NTT-form plaintext whose coefficients are ``words`` (uint64, < q)."""
        plain = self._seal.Plaintext()
        blob = seal_blob(self._seal_version, self._plain_prefix + np.ascontiguousarray(words, dtype="<u8").tobytes())
        try:
            self._scratch.load(plain, self._context, blob)
        except (RuntimeError, ValueError) as exc:
            raise CodecError(f"SEAL refused a plaintext: {exc}") from exc
        return plain

    def _decompress_seal(self, saved: bytes, limit: int) -> bytes:
        if len(saved) < SEAL_HEADER.size or SEAL_HEADER.unpack_from(saved)[4] != SEAL_ZSTD:
            raise CodecError("SEAL wrote an unexpected serialization header")
        return self._zstd.decompress(memoryview(saved)[SEAL_HEADER.size :], max_output_size=limit)

    # encoding

    def _encode(self, coeffs: np.ndarray):
        """A plaintext whose polynomial coefficients are round(coeffs * scale)."""
        half = self.POLY_MODULUS_DEGREE // 2
        folded = (coeffs[:half] + 1j * coeffs[half:]) * self._twist
        slots = np.fft.ifft(folded, norm="forward")[self._fold_index]
        np.conjugate(slots, out=slots, where=self._conj_slots)
        plain = self._seal.Plaintext()
        self._encoder.encode(slots.tolist(), self.scale, plain)
        return plain

    def _decode(self, plain) -> np.ndarray:
        half = self.POLY_MODULUS_DEGREE // 2
        slots = np.asarray(self._encoder.decode_complex(plain))
        np.conjugate(slots, out=slots, where=self._conj_slots)
        folded = np.empty(half, dtype=np.complex128)
        folded[self._fold_index] = slots
        folded = np.fft.fft(folded, norm="forward") * np.conj(self._twist)
        return np.concatenate([folded.real, folded.imag])

    # hospital side

    def n_chunks(self, n_params: int) -> int:
        return -(-int(n_params) // self.POLY_MODULUS_DEGREE)

    def noise_of_sum(self, n_updates: int) -> float:
        """The noise of k encryptions is a sum of 42 k coin flips minus 21 k (each in
        [-1/2, 1/2]): by Hoeffding it exceeds 34.33 sqrt(k) with probability below 2^-80 per
        coefficient (t^2 = 21 k ln 2^81); it never exceeds 21 k."""
        return min(self.NOISE_BOUND * n_updates, 34.33 * math.sqrt(n_updates)) / self.scale

    def frame_bytes(self, n_updates: int = 1) -> int:
        """Bytes of one chunk frame of a stream summing ``n_updates`` updates."""
        return U32.size + self.SEED_BYTES * n_updates + self.PACKED_BYTES * self.POLY_MODULUS_DEGREE

    def encrypt_update(self, weights: np.ndarray, n_samples: int, out: BinaryIO, *,
                       max_contributors: int | None = None) -> int:
        check_samples(n_samples, "n_samples")
        k = check_contributors(DEFAULT_MAX_CONTRIBUTORS if max_contributors is None else max_contributors)
        self._require_secret("encrypt (compact encryption is symmetric: it needs the secret key)")
        values = as_weights(weights, dtype=None)  # float32 stays float32: no 2x copy to check it
        self.check_update_range(float(np.max(np.abs(values))) * n_samples, k)
        grid = int(self.grid(k) * self.scale)  # in units of the scale: a power of two
        header = UpdateHeader(self.profile, self.fingerprint, values.size, self.n_chunks(values.size))
        written = write_header(out, header)
        for blob in self._encrypted_chunks(values, n_samples, grid):
            written += write_frame(out, blob)
        return written

    def _encrypted_chunks(self, weights: np.ndarray, n_samples: int, grid: int):
        if not self._use_pool(weights.size):
            yield from self.encrypt_chunks(weights, n_samples, grid)
            return
        # The weights and the chunk blobs cross between processes through two files in
        # memory (tmpfs), not through the pool's pipes: pickling ~1 MB each way per task and
        # copying it through a pipe cost the workers ~10-15% of their time.
        n, chunks = self.POLY_MODULUS_DEGREE, self.n_chunks(weights.size)
        per_task = -(-chunks // (self.TASKS_PER_WORKER * self.workers))
        step = 2 * max(1, min(self.TASK_CHUNKS, per_task) // 2)  # whole pairs (see PlainLoader.residues)
        blob_len = self.SEED_BYTES + self.PACKED_BYTES * n
        values = np.ascontiguousarray(weights)
        with shared_file("cxr-mq-weights") as (src, src_path), shared_file("cxr-mq-chunks") as (dst, dst_path):
            src.write(memoryview(values).cast("B"))
            src.flush()
            dst.truncate(chunks * blob_len)
            tasks = (
                (src_path, values.dtype.str, values.size, first, min(step, chunks - first), n_samples, grid,
                 dst_path)
                for first in range(0, chunks, step)
            )
            for first, count in self._ordered_map(pool_encrypt, tasks):
                data = os.pread(dst.fileno(), count * blob_len, first * blob_len)
                if len(data) != count * blob_len:
                    raise CodecError(f"chunks {first}..{first + count - 1}: a worker wrote {len(data)} bytes")
                view = memoryview(data)
                for i in range(count):
                    yield view[i * blob_len : (i + 1) * blob_len]

    def encrypt_chunks(self, weights: np.ndarray, n_samples: float, grid: int = 1) -> list[bytes]:
        """Encrypt ``n_samples * weights``, quantized to multiples of ``grid`` units of the
        scale, as chunk blobs, in this process (no range check: see ``encrypt_update``).

        In batches of ``ENCRYPT_BATCH`` chunks: first every chunk's ``c0`` is computed in
        SEAL, then all are serialized. Alternating SEAL's NTT with its zstd serialization
        chunk by chunk evicts each other's tables from the cache (~8% slower measured)."""
        step, batch = 2 * self.POLY_MODULUS_DEGREE, self.ENCRYPT_BATCH * self.POLY_MODULUS_DEGREE
        factor = float(n_samples) * self.scale  # w * factor == (w * n) * 2^28, exactly
        loader = self._plain_loader
        noise = aes_ctr(os.urandom(32))  # one secret keystream for this call's noise
        blobs = []
        for first in range(0, weights.size, batch):
            pending = []
            for start in range(first, min(first + batch, weights.size), step):
                for row in loader.residues(weights[start : start + step], factor, noise=noise,
                                           noise_bits=self.NOISE_BITS, grid=grid):
                    pending.append(self._encrypt_row(row))
            tag = bytes((self.PRNG_TAG,))
            for seed, plain in pending:
                blobs.append(tag + seed + pack_words(self._plain_words(plain), self.PACKED_BYTES))
        return blobs

    def _encrypt_row(self, row: np.ndarray):
        """(seed, NTT-form plaintext holding c0) of one chunk encrypting the residues
        ``row`` = m + e mod q."""
        seed = os.urandom(self.SEED_BYTES - 1)
        u = expand_seed(seed, self.POLY_MODULUS_DEGREE, self.q, self.PACKED_BYTES)
        ct = self._plain_loader.load(self._context, row, u)  # (m + e, u), coefficient form
        self._evaluator.transform_to_ntt_inplace(ct)  # (NTT(m + e), NTT(u))
        plain = self._seal.Plaintext()
        self._decryptor.decrypt(ct, plain)  # NTT(m + e) + NTT(u) * s: c0 of (c0, -NTT(u))
        return seed, plain

    # aggregator side

    def new_sum(self, n_params: int, *, max_updates: int | None = None,
                distinct_updates: bool = True) -> "CompactSum":
        return CompactSum(self, n_params, max_updates, distinct_updates)

    def seed_records(self, seeds: np.ndarray) -> list[bytes]:
        """The seed records of a batch of chunks' seeds (rows of 33 k bytes), one per update
        per chunk."""
        return [row.tobytes() for row in np.ascontiguousarray(seeds).reshape(-1, self.SEED_BYTES)]

    def check_seed_records(self, src: BinaryIO, header: UpdateHeader) -> None:
        """Read a stream's chunks once and refuse it unless every seed record in it is
        distinct: the same seed twice in a sum means the same update twice (a sum of k copies
        decrypts to k times one hospital's update). Leaves ``src`` where it was."""
        start = src.tell()
        seen: set[bytes] = set()
        for first, _, seeds in self._read_chunks(src, header):
            records = self.seed_records(seeds)
            seen.update(records)
            if len(seen) != (first + seeds.shape[0]) * header.n_updates:
                raise CodecError(f"chunks {first}..{first + seeds.shape[0] - 1}: a seed record appears twice "
                                 "(the same encryption summed more than once)")
        src.seek(start)

    def _read_chunks(self, src: BinaryIO, header: UpdateHeader):
        """Yield (first chunk index, c0 (b, N) uint64, seeds (b, 33 k) uint8) in batches.

        Everything in a batch is checked (frame lengths, PRNG tags, c0 < q) before it is
        yielded, so a caller adds only well-formed chunks.
        """
        k, n, width = header.n_updates, self.POLY_MODULUS_DEGREE, self.PACKED_BYTES
        frame = self.frame_bytes(k)
        if frame > MAX_CHUNK_BYTES:
            raise CodecError(f"a stream of {k} summed updates is beyond this codec's limit")
        seeds_at = U32.size
        c0_at = seeds_at + self.SEED_BYTES * k
        for first in range(0, header.n_chunks, self.READ_BATCH):
            b = min(self.READ_BATCH, header.n_chunks - first)
            buf = bytearray(b * frame + 8)  # 8 spare bytes: the last word is read unaligned
            read_into(src, memoryview(buf)[: b * frame], f"chunks {first}..{first + b - 1}")
            lengths = np.ndarray((b,), dtype=">u4", buffer=buf, offset=0, strides=(frame,))
            if np.any(lengths != frame - U32.size):
                bad = int(np.argmax(lengths != frame - U32.size))
                raise CodecError(
                    f"chunk {first + bad}: frame of {int(lengths[bad])} bytes, expected {frame - U32.size}"
                )
            seeds = np.ndarray((b, self.SEED_BYTES * k), dtype=np.uint8, buffer=buf, offset=seeds_at, strides=(frame, 1))
            if not np.all(seeds[:, :: self.SEED_BYTES] == self.PRNG_TAG):
                raise CodecError(f"chunks {first}..{first + b - 1}: unknown PRNG tag in a seed")
            c0 = strided_words(buf, c0_at, (b, n), (frame, width)) & self._word_mask
            if c0.max() >= self.q:
                raise CodecError(f"chunks {first}..{first + b - 1}: coefficient not reduced modulo q")
            yield first, c0, seeds.copy()

    # decryption

    def _decrypt_chunks(self, src: BinaryIO, header: UpdateHeader) -> np.ndarray:
        n = self.POLY_MODULUS_DEGREE
        if not src.seekable():
            src = io.BytesIO(src.read(header.n_chunks * self.frame_bytes(header.n_updates) + 1))
        self.check_seed_records(src, header)  # before anything is decrypted
        total = np.empty(header.n_chunks * n, dtype=np.float64)
        batches = self._read_chunks(src, header)
        if self._use_pool(header.n_params * header.n_updates):
            results = self._ordered_map(pool_decrypt, ((c0, seeds, header.n_updates) for _, c0, seeds in batches))
        else:
            results = (self.decrypt_chunks(c0, seeds, header.n_updates) for _, c0, seeds in batches)
        offset = 0
        for values in results:
            total[offset : offset + values.size] = values.reshape(-1)
            offset += values.size
        return total[: header.n_params]

    def decrypt_chunks(self, c0: np.ndarray, seeds: np.ndarray, k: int) -> np.ndarray:
        """Decrypt a batch of chunks (c0 rows and their k seeds each) in this process."""
        out = np.empty(c0.shape, dtype=np.float64)
        for row in range(c0.shape[0]):
            out[row] = self._decrypt_chunk(c0[row], seeds[row].tobytes(), k)
        return out

    def _decrypt_chunk(self, c0: np.ndarray, seeds: bytes, k: int) -> np.ndarray:
        """Values of one chunk of a sum of k updates: (sum c0, -NTT(sum u)) through SEAL."""
        q, width = np.uint64(self.q), self.SEED_BYTES
        total = np.zeros(self.POLY_MODULUS_DEGREE, dtype=np.uint64)
        for j in range(k):  # the sum's c1 is minus the NTT of the sum of the expanded seeds
            record = seeds[j * width : (j + 1) * width]
            if record[0] != self.PRNG_TAG:
                raise CodecError("unknown PRNG tag in a seed")
            total += expand_seed(record[1:], self.POLY_MODULUS_DEGREE, self.q, self.PACKED_BYTES)
            total = np.minimum(total, total - q)  # both < q < 2^63: wraps above where smaller
        minus = q - total
        minus[total == 0] = 0
        ct = self._plain_loader.load(self._context, self._zero_row, minus)
        self._evaluator.transform_to_ntt_inplace(ct)  # (0, -NTT(sum u))
        self._evaluator.add_plain_inplace(ct, self._load_plain(c0))
        plain = self._seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        return self._decode(plain)

    # process pool (hospital side: encryption and decryption)

    def _use_pool(self, work_params: int) -> bool:
        return self.has_secret_key and self.workers > 1 and work_params >= self.parallel_min_params

    def _ordered_map(self, fn, tasks):
        """fn(task) over a process pool, results in task order, a bounded number in flight."""
        executor = self._pool()
        window = 2 * self.workers
        pending = []
        for task in tasks:
            pending.append(executor.submit(fn, task))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()

    def _pool(self):
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent may hold TensorFlow threads and SEAL memory pools
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=pool_init,
                initargs=(self.secret_bytes(), os.getpid()),
            )
            weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        return self._executor

    def warm_up(self) -> None:
        """Start the process pool now rather than on the first large update."""
        if self.has_secret_key and self.workers > 1:
            list(self._ordered_map(pool_ping, range(self.workers)))

    def pool_pids(self) -> list[int]:
        """Process ids of the pool's workers (for CPU accounting in the bench)."""
        return list(getattr(self._executor, "_processes", None) or {})

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __getstate__(self):
        raise TypeError("a CompactCodec is not picklable; send secret_bytes() or public_bytes()")


class CompactSum(EncryptedSum):
    """The running sum of c0 halves modulo q, plus the seeds of every summed update."""

    codec: CompactCodec

    def __init__(self, codec: CompactCodec, n_params: int, max_updates: int | None = None,
                 distinct_updates: bool = True):
        super().__init__(codec, n_params, max_updates, distinct_updates)
        n = codec.POLY_MODULUS_DEGREE
        self._sum = np.zeros((self.n_chunks, n), dtype=np.uint64)
        self._staged: np.ndarray | None = None
        self._seeds: list[np.ndarray] = []  # one (n_chunks, 33 k) array per added stream
        self._records: set[bytes] = set()  # every seed record in the sum (distinct_updates)

    def _stage(self, src: BinaryIO, header: UpdateHeader) -> np.ndarray:
        if self._staged is None:
            self._staged = np.empty_like(self._sum)
            self._work = np.empty((self.codec.READ_BATCH, self._sum.shape[1]), dtype=np.uint64)
        q = np.uint64(self.codec.q)
        seeds = np.empty((self.n_chunks, self.codec.SEED_BYTES * header.n_updates), dtype=np.uint8)
        for first, c0, chunk_seeds in self.codec._read_chunks(src, header):
            rows = slice(first, first + c0.shape[0])
            work = self._work[: c0.shape[0]]
            np.add(c0, self._sum[rows], out=c0)  # both < q < 2^63: no overflow
            np.subtract(c0, q, out=work)  # wraps to above c0 where c0 < q
            np.minimum(c0, work, out=self._staged[rows])
            seeds[rows] = chunk_seeds
        records = set(self.codec.seed_records(seeds))
        if len(records) != self.n_chunks * header.n_updates:
            raise CodecError("a seed record appears twice in the stream: each chunk of each update has its own seed")
        if self.distinct_updates and not records.isdisjoint(self._records):
            raise CodecError("a seed record of this stream is in the sum already: the same encryption added twice")
        return seeds, records

    def _commit(self, staged: tuple, header: UpdateHeader) -> None:
        seeds, records = staged
        self._sum, self._staged = self._staged, self._sum
        self._seeds.append(seeds)
        if self.distinct_updates:
            self._records |= records

    def _chunk_blobs(self):
        width = self.codec.SEED_BYTES
        for i in range(self.n_chunks):
            row = b"".join(seeds[i].tobytes() for seeds in self._seeds)
            records = sorted(row[j : j + width] for j in range(0, len(row), width))
            yield b"".join(records) + pack_words(self._sum[i], self.codec.PACKED_BYTES)

"""Encryption randomness that decryption cannot notice.

Two changes pass every round-trip test because decryption still works: every chunk of an
update reusing one seed (one mask for all chunks, so chunk-to-chunk plaintext differences
show), and no RLWE noise at encryption (decryption exact; the key then falls to linear
algebra). These tests look at what the round trip hides: the seed records of all chunks of
one update, and the error of the raw decryption inside the codec (before any rounding of the
decrypted values, which would hide the noise on purpose).
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest

from cxr_mq import crypto
from cxr_mq.crypto import wire


@pytest.fixture(scope="module")
def compact_codec():
    codec = crypto.load_context(crypto.generate_keys("compact").secret)
    codec.workers = 1  # in this process: the chunks of one call, not a pool's tasks
    return codec


def _chunk_frames(codec, weights) -> list[bytes]:
    """The chunk blobs of one update, read back from the stream the hospital uploads."""
    buf = io.BytesIO()
    codec.encrypt_update(weights, 1, buf)
    src = io.BytesIO(buf.getvalue())
    header = codec.read_header(src)
    return [wire.read_frame(src, f"chunk {i}") for i in range(header.n_chunks)]


def _first_repeat(records):
    for (i, a), (j, b) in itertools.combinations(enumerate(records), 2):
        if a == b:
            return i, j
    return None


def test_every_chunk_of_one_update_draws_its_own_seed(compact_codec):
    codec = compact_codec
    # a constant update (worst case) over more chunks than one encryption batch holds
    n_chunks = 2 * codec.ENCRYPT_BATCH + 3
    frames = _chunk_frames(codec, np.zeros(n_chunks * codec.POLY_MODULUS_DEGREE))
    assert len(frames) == n_chunks
    seeds = [frame[: codec.SEED_BYTES] for frame in frames]
    assert all(s[0] == codec.PRNG_TAG for s in seeds)
    repeat = _first_repeat(seeds)
    assert repeat is None, (
        f"chunks {repeat} of one update carry the same seed record: they share one mask u, so "
        f"the difference of their c0 is the difference of their plaintexts (seed drawn once per "
        f"update instead of once per chunk?)")
    repeat = _first_repeat([frame[codec.SEED_BYTES:] for frame in frames])
    assert repeat is None, f"chunks {repeat} of a constant update have identical c0"


def test_every_chunk_of_a_seed_profile_update_is_encrypted_afresh():
    codec = crypto.load_context(crypto.generate_keys("seed").secret)
    frames = _chunk_frames(codec, np.zeros(3 * codec.SLOTS))
    repeat = _first_repeat(frames)
    assert repeat is None, f"chunks {repeat} of a constant update are identical ciphertexts"


def _raw_errors(codec, n_chunks: int) -> np.ndarray:
    """Per chunk, the error of SEAL's decryption of integer plaintexts (exact under the
    encoding): e = decrypt(encrypt(m)) * scale - m, before any rounding of decrypted values."""
    n = codec.POLY_MODULUS_DEGREE
    m = np.random.default_rng(16).integers(-(1 << 30), 1 << 30, (n_chunks, n)).astype(np.float64)
    blobs = codec.encrypt_chunks(m.ravel(), 1.0 / codec.scale)  # factor 1: coefficients = m
    errors = []
    for row, blob in zip(m, blobs):
        seed, c0 = blob[: codec.SEED_BYTES], wire.unpack_words(blob[codec.SEED_BYTES :], codec.PACKED_BYTES)
        errors.append(codec._decrypt_chunk(c0, seed, 1) * codec.scale - row)
    return np.array(errors)


def test_decryption_error_is_the_samplers_noise(compact_codec):
    codec = compact_codec
    e = _raw_errors(codec, 4)
    ints = np.rint(e)
    assert np.max(np.abs(e - ints)) < 1e-3, "raw decryption of integer coefficients is not integral"
    zero_share = float(np.mean(ints == 0))
    # centered binomial with 21 + 21 bits: P(e = 0) ~ 0.12, variance 10.5, |e| <= 21
    assert zero_share < 0.3, (
        f"decryption is exact for {zero_share:.0%} of coefficients: the RLWE error term did not "
        f"reach the ciphertext (no noise at encryption makes the secret key a linear-algebra problem)")
    expected = codec.NOISE_BITS / 2
    assert abs(ints.var() - expected) < 1.0, (
        f"decryption error variance {ints.var():.2f}, the sampler's is {expected} (cbd-{codec.NOISE_BITS})")
    assert abs(ints.mean()) < 0.2, f"decryption error is biased: mean {ints.mean():.3f}"
    assert np.max(np.abs(ints)) <= codec.NOISE_BOUND
    repeat = _first_repeat([row.tobytes() for row in ints])
    assert repeat is None, f"chunks {repeat} got the same noise: the noise stream restarts per chunk"
    again = _raw_errors(codec, 1)[0]
    assert not np.array_equal(np.rint(again), ints[0]), "two encryptions drew the same noise"

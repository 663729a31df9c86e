"""CKKS codec: round trips, precision, mismatch rejection, atomic adds, determinism, memory."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cxr_mq import crypto
from cxr_mq.crypto import CodecError, CodecMismatch, SecretKeyPresent, compact, sampling, sealio, wire

PROFILES = sorted(crypto.SINGLE_KEY_PROFILES)  # the threshold profile: test_threshold_*.py


@pytest.fixture(scope="module", params=PROFILES)
def keys(request):
    return request.param, crypto.generate_keys(request.param)


@pytest.fixture(scope="module")
def codecs(keys):
    profile, pair = keys
    return crypto.load_context(pair.secret), crypto.load_context(pair.public)


def _encrypt(codec, weights, n, **kwargs):
    buf = io.BytesIO()
    written = codec.encrypt_update(weights, n, buf, **kwargs)
    assert written == len(buf.getvalue())
    return buf.getvalue()


def test_profile_and_fingerprint_survive_serialization(keys, codecs):
    profile, _ = keys
    secret, public = codecs
    assert secret.profile == public.profile == profile
    assert secret.fingerprint == public.fingerprint
    assert len(secret.fingerprint) == 64
    assert secret.has_secret_key and not public.has_secret_key
    public.require_public_only()
    with pytest.raises(SecretKeyPresent):
        secret.require_public_only()
    assert crypto.load_context(public.public_bytes()).fingerprint == public.fingerprint
    assert crypto.load_context(secret.public_bytes()).has_secret_key is False


def test_round_trip_single_update(codecs):
    secret, _ = codecs
    rng = np.random.default_rng(1)
    w = rng.uniform(-10, 10, 10_000)
    blob = _encrypt(secret, w, 37)
    header = secret.read_header(io.BytesIO(blob))
    assert (header.profile, header.n_params) == (secret.profile, w.size)
    out = secret.decrypt_update(io.BytesIO(blob), 37)
    assert out.dtype == np.float64 and out.shape == w.shape
    assert np.max(np.abs(out - w)) < 1e-6


def test_fedavg_precision_ten_hospitals(codecs):
    """10 hospitals, sample counts up to 100,000, weights in [-10, 10]: within 1e-6 of float64."""
    secret, public = codecs
    rng = np.random.default_rng(2)
    n_params = 20_000
    counts = [100_000, 1, 99_999, 50_000, 7, 100_000, 3, 100_000, 12_345, 100_000]
    weights = [rng.uniform(-10, 10, n_params) for _ in counts]
    weights[0][:100] = 10.0  # the extremes of the range
    weights[5][:100] = 10.0
    total = public.new_sum(n_params)
    for w, n in zip(weights, counts):
        total.add(io.BytesIO(_encrypt(secret, w, n)))
    assert total.count == len(counts)
    buf = io.BytesIO()
    total.write(buf)
    buf.seek(0)
    got = secret.decrypt_aggregate(buf, sum(counts))
    expected = sum(n * w for w, n in zip(weights, counts)) / sum(counts)
    assert np.max(np.abs(got - expected)) < 1e-6


def test_sum_is_deterministic_in_any_order(codecs):
    secret, public = codecs
    rng = np.random.default_rng(3)
    blobs = [_encrypt(secret, rng.uniform(-1, 1, 5000), n) for n in (3, 5, 11)]
    outputs = []
    for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):
        total = public.new_sum(5000)
        for i in order:
            total.add(io.BytesIO(blobs[i]))
        buf = io.BytesIO()
        total.write(buf)
        outputs.append(buf.getvalue())
    assert outputs[0] == outputs[1] == outputs[2]
    header = public.read_header(io.BytesIO(outputs[0]))
    assert header.n_updates == 3


def test_sum_of_sums_equals_sum(codecs):
    secret, public = codecs
    rng = np.random.default_rng(4)
    ws = [rng.uniform(-1, 1, 3000) for _ in range(3)]
    blobs = [_encrypt(secret, w, 2) for w in ws]
    partial = public.new_sum(3000)
    partial.add(io.BytesIO(blobs[0]))
    partial.add(io.BytesIO(blobs[1]))
    pbuf = io.BytesIO()
    partial.write(pbuf)
    total = public.new_sum(3000)
    total.add(io.BytesIO(pbuf.getvalue()), n_updates=2)
    total.add(io.BytesIO(blobs[2]))
    assert total.count == 3
    out = io.BytesIO()
    total.write(out)
    out.seek(0)
    got = secret.decrypt_aggregate(out, 6)
    assert np.max(np.abs(got - sum(ws) / 3)) < 1e-6


def test_aggregator_cannot_decrypt(codecs):
    secret, public = codecs
    blob = _encrypt(secret, np.ones(10), 1)
    with pytest.raises(CodecError):
        public.decrypt_update(io.BytesIO(blob), 1)


def test_rejects_other_key_and_shape(keys, codecs):
    profile, _ = keys
    secret, public = codecs
    other = crypto.load_context(crypto.generate_keys(profile).secret)
    assert other.fingerprint != secret.fingerprint
    foreign = _encrypt(other, np.ones(100), 1)
    total = public.new_sum(100)
    with pytest.raises(CodecMismatch, match="fingerprint"):
        total.add(io.BytesIO(foreign))
    with pytest.raises(CodecMismatch, match="n_params"):
        public.new_sum(101).add(io.BytesIO(_encrypt(secret, np.ones(100), 1)))
    assert total.count == 0


def test_rejects_other_profile():
    if len(PROFILES) < 2:
        pytest.skip("one profile only")
    a = crypto.load_context(crypto.generate_keys(PROFILES[0]).secret)
    b = crypto.load_context(crypto.generate_keys(PROFILES[1]).public)
    blob = _encrypt(a, np.ones(50), 1)
    with pytest.raises(CodecMismatch) as err:
        b.new_sum(50).add(io.BytesIO(blob))
    assert PROFILES[0] in str(err.value) and PROFILES[1] in str(err.value)
    with pytest.raises(CodecMismatch, match="profile"):
        b.read_header(io.BytesIO(blob))


def test_bad_stream_leaves_sum_untouched(codecs):
    secret, public = codecs
    rng = np.random.default_rng(5)
    n_params = 9000  # several chunks for every profile
    w1, w2 = rng.uniform(-1, 1, n_params), rng.uniform(-1, 1, n_params)
    good, other = _encrypt(secret, w1, 1), _encrypt(secret, w2, 1)
    total = public.new_sum(n_params)
    total.add(io.BytesIO(good))
    before = io.BytesIO()
    total.write(before)
    corrupt = bytearray(other)
    corrupt[-20:] = bytes(20 * [0xFF])
    bad_streams = {
        "truncated": other[: len(other) - 100],
        "truncated in header": other[:10],
        "corrupt last chunk": bytes(corrupt),
        "garbage": b"\x00" * 64,
        "trailing bytes": other + b"x",
    }
    for name, blob in bad_streams.items():
        with pytest.raises(CodecError):
            total.add(io.BytesIO(blob))
        after = io.BytesIO()
        total.write(after)
        assert after.getvalue() == before.getvalue(), name
        assert total.count == 1
    total.add(io.BytesIO(other))
    out = io.BytesIO()
    total.write(out)
    out.seek(0)
    # Quantization only (the noise is rounded away): two updates on the grid for the default 3
    # contributors are off by at most 2 * precision(3), 9.54e-7 for compact (measured 9.39e-7,
    # the same on every CPU: w is seeded), 4.8e-7 for seed. A lost or doubled update is off by ~|w|.
    assert np.max(np.abs(secret.decrypt_aggregate(out, 1) - (w1 + w2))) < 1e-6


def test_bad_inputs(codecs):
    secret, public = codecs
    with pytest.raises(CodecError):
        secret.encrypt_update(np.ones((2, 2)), 1, io.BytesIO())
    with pytest.raises(CodecError):
        secret.encrypt_update(np.array([1.0, np.nan]), 1, io.BytesIO())
    with pytest.raises(CodecError):
        secret.encrypt_update(np.ones(3), 0, io.BytesIO())
    with pytest.raises(CodecError):
        public.new_sum(3).write(io.BytesIO())


def test_load_context_errors(tmp_path):
    with pytest.raises(CodecError):
        crypto.load_context(b"not a context at all")
    with pytest.raises(CodecError):
        crypto.load_context(crypto.KEY_MAGIC + b"\xc1garbage")
    bad = tmp_path / "ctx.bin"
    bad.write_bytes(b"junk")
    with pytest.raises(CodecError, match="ctx.bin"):
        crypto.load_context_file(bad)
    with pytest.raises(CodecError, match="missing.bin"):
        crypto.load_context_file(tmp_path / "missing.bin")
    with pytest.raises(CodecError, match="unknown codec profile"):
        crypto.generate_keys("nope")


def test_load_context_file(tmp_path, keys, codecs):
    _, pair = keys
    path = tmp_path / "public.ctx"
    path.write_bytes(pair.public)
    assert crypto.load_context_file(path).fingerprint == codecs[1].fingerprint


# --------------------------------------------------------------------------- precision edges


@pytest.mark.parametrize("count", [1, 100_000])
def test_fedavg_precision_at_the_extremes(codecs, count):
    """All 10 hospitals at one sample (smallest total) or 100,000 (largest sum), |w| = 10:
    within 1e-6, or the stated quantization bound where one sample per hospital makes it
    larger (10 * precision(10) / 10 = 1.9e-6 for compact)."""
    secret, public = codecs
    rng = np.random.default_rng(count)
    n_params = 12_000
    weights = [rng.choice([-10.0, 10.0], n_params) for _ in range(10)]
    for w in weights:
        w[:500] = 10.0  # the sum reaches 10 * 10 * count
    total = public.new_sum(n_params, max_updates=10)
    for w in weights:
        total.add(io.BytesIO(_encrypt(secret, w, count, max_contributors=10)))
    buf = io.BytesIO()
    total.write(buf)
    buf.seek(0)
    got = secret.decrypt_aggregate(buf, 10 * count, n_updates=10)
    expected = sum(weights) / 10
    stated = 10 * secret.precision(10) / (10 * count)
    assert np.max(np.abs(got - expected)) <= max(1e-6, stated * (1 + 1e-9))


def test_compact_noise_bound():
    """Coefficient encoding: one update's error is its quantization to the grid, nothing more
    (the noise is rounded away)."""
    codec = crypto.load_context(crypto.generate_keys("compact").secret)
    w = np.random.default_rng(7).uniform(-10, 10, 3 * codec.POLY_MODULUS_DEGREE)
    out = codec.decrypt_update(io.BytesIO(_encrypt(codec, w, 1, max_contributors=1)), 1)
    assert np.max(np.abs(out - w)) <= codec.precision(1)
    assert codec.precision(1) == 2.0**-21  # grid 2^-20: 256 units of 2^-28, twice (21 + 64) rounded up


@pytest.fixture(scope="module")
def compact_codec():
    return crypto.load_context(crypto.generate_keys("compact").secret)


def _chunk_rows(codec, pattern):
    """Integer coefficients, one row per chunk: 'r' random (both signs, up to 2^40), '0' zero."""
    rng = np.random.default_rng(len(pattern))
    n = codec.POLY_MODULUS_DEGREE
    rows = [rng.integers(-(1 << 40), 1 << 40, n) if c == "r" else np.zeros(n, dtype=np.int64) for c in pattern]
    return np.array(rows, dtype=np.float64)


def test_compact_seed_expansion_is_deterministic_uniform_and_rejects_out_of_range(compact_codec):
    """A seed stands for one polynomial: the same on every machine, uniform modulo q, and
    words >= q are skipped (forced here with a small modulus), not reduced."""
    n, q, width = compact_codec.POLY_MODULUS_DEGREE, compact_codec.q, compact_codec.PACKED_BYTES
    key = bytes(range(32))
    u = sampling.expand_seed(key, n, q, width)
    assert u.dtype == np.uint64 and u.shape == (n,)
    assert np.array_equal(u, sampling.expand_seed(key, n, q, width))
    assert not np.array_equal(u, sampling.expand_seed(bytes(32), n, q, width))
    assert int(u.max()) < q
    # uniform: each of 16 equal bins of [0, q) holds n/16 +- 5 sigma
    counts = np.bincount((u // np.uint64(q // 16 + 1)).astype(np.int64), minlength=16)
    assert np.all(np.abs(counts - n / 16) < 5 * np.sqrt(n / 16)), counts
    # the stream's first words, read by hand: 7-byte little-endian words of AES-256-CTR
    stream = sampling.aes_ctr(key).update(bytes(7 * 4))
    assert [int.from_bytes(stream[7 * i : 7 * i + 7], "little") for i in range(4)] == u[:4].tolist()
    # a modulus of 2^55: about half the words are rejected; the kept ones are the words < q
    small = 1 << 55
    v = sampling.expand_seed(key, n, small, width)
    all_words = wire.unpack_words(sampling.aes_ctr(key).update(bytes(7 * 3 * n)), 7)
    assert np.array_equal(v, all_words[all_words < np.uint64(small)][:n])


def test_compact_noise_is_seals_centered_binomial_and_fresh():
    stream = sampling.aes_ctr(bytes(32))
    e = sampling.cbd_noise(stream, 1 << 16, 21)
    assert e.dtype == np.int64 and int(np.abs(e).max()) <= 21
    assert abs(e.mean()) < 0.06 and abs(e.var() - 10.5) < 0.4  # sigma 3.24, as SEAL's 3.2
    # the stream moves on: the next draw is different
    assert not np.array_equal(e[:1000], sampling.cbd_noise(stream, 1000, 21))
    # by hand: the first sample is popcount of the low 21 bits minus popcount of the next 21
    word = int.from_bytes(sampling.aes_ctr(bytes(32)).update(bytes(8)), "little")
    mask = (1 << 21) - 1
    assert e[0] == bin(word & mask).count("1") - bin((word >> 21) & mask).count("1")


def test_compact_encryption_is_randomised_and_needs_the_key(compact_codec):
    """The same update encrypts differently every time (fresh seed and noise); c0 on its own
    is indistinguishable from uniform; another key does not decrypt it."""
    codec = compact_codec
    n, width = codec.POLY_MODULUS_DEGREE, codec.SEED_BYTES
    w = np.zeros(n)  # the worst case for leakage: a constant update
    first, second = codec.encrypt_chunks(w, 1), codec.encrypt_chunks(w, 1)
    assert first[0][0] == second[0][0] == codec.PRNG_TAG
    assert first[0][:width] != second[0][:width] and first[0][width:] != second[0][width:]
    c0 = wire.unpack_words(first[0][width:], 7)
    assert c0.shape == (n,)
    counts = np.bincount((c0 // np.uint64(codec.q // 16 + 1)).astype(np.int64), minlength=16)
    # random per run (fresh seed): 16 bins at 5 sigma fail once in ~250,000 runs; the worst bin of
    # 30 runs here was 3.5 sigma. A c0 that leaks (e.g. c0 = m + e, no a*s) fills one or two bins.
    assert np.all(np.abs(counts - n / 16) < 5 * np.sqrt(n / 16)), counts
    other = crypto.load_context(crypto.generate_keys("compact").secret)
    blob = _encrypt(codec, np.full(n, 0.5), 1)
    assert np.max(np.abs(codec.decrypt_update(io.BytesIO(blob), 1) - 0.5)) < 1e-6
    with pytest.raises(CodecMismatch):  # another key: refused by fingerprint, and would not decrypt either
        other.decrypt_update(io.BytesIO(blob), 1)
    c0_sum = wire.unpack_words(blob[-7 * n :], 7)
    seed = blob[-7 * n - width : -7 * n]
    right = codec._decrypt_chunk(c0_sum, seed, 1)
    assert np.max(np.abs(right - 0.5)) < 1e-6
    wrong = other._decrypt_chunk(c0_sum, seed, 1)
    assert np.max(np.abs(wrong - 0.5)) > 1.0


def test_compact_sum_refuses_an_unknown_prng_tag(compact_codec):
    codec = compact_codec
    blob = bytearray(_encrypt(codec, np.ones(100), 1))
    header_len = len(blob) - codec.frame_bytes()
    blob[header_len + 4] ^= 0xFF  # the first seed's tag
    with pytest.raises(CodecError, match="PRNG tag"):
        codec.new_sum(100).add(io.BytesIO(bytes(blob)))


def test_pack_and_unpack_words_are_inverse():
    values = np.array([0, 1, (1 << 56) - 1, 0x0123456789ABCD], dtype=np.uint64)
    packed = wire.pack_words(values, 7)
    assert len(packed) == 4 * 7 and packed[7:14] == b"\x01" + bytes(6)
    assert np.array_equal(wire.unpack_words(packed, 7), values)


def test_compact_residues_round_and_wrap(compact_codec):
    codec = compact_codec
    n, q = codec.POLY_MODULUS_DEGREE, codec.q
    values = np.zeros(n + 3)
    values[:6] = [0.4, 0.6, -0.4, -0.6, -1.0, -(2.0**51)]
    values[-1] = 2.0**51
    rows = codec._plain_loader.residues(values, 1.0)
    assert rows.shape == (2, n) and rows.dtype == np.uint64
    assert rows[0, :6].tolist() == [0, 1, 0, q - 1, q - 1, q - 2**51]
    assert rows[1, 2] == 2**51 and not rows[1, 3:].any()  # zero padding of the last chunk
    with pytest.raises(CodecError):
        codec._plain_loader.residues(np.zeros(2 * n + 1), 1.0)


@pytest.mark.parametrize("pattern", ["r0r", "0r0", "000", "r0rr0"])
def test_compact_zero_chunks_round_trip(compact_codec, pattern):
    """Updates with all-zero chunks (frozen layers) and a partial last chunk round-trip."""
    codec = compact_codec
    n = codec.POLY_MODULUS_DEGREE
    w = np.random.default_rng(11).uniform(-10, 10, len(pattern) * n - 17)
    for i, c in enumerate(pattern):
        if c == "0":
            w[i * n : (i + 1) * n] = 0.0
    n_samples = 1000
    out = codec.decrypt_update(io.BytesIO(_encrypt(codec, w, n_samples)), n_samples)
    assert np.max(np.abs(out - w)) <= codec.precision(crypto.DEFAULT_MAX_CONTRIBUTORS) / n_samples


def test_compact_plain_loader_refuses_foreign_rows(compact_codec):
    loader, n = compact_codec._plain_loader, compact_codec.POLY_MODULUS_DEGREE
    with pytest.raises(CodecError, match="does not fit"):
        loader.load(compact_codec._context, np.ones(n - 1, dtype=np.uint64), np.ones(n, dtype=np.uint64))
    with pytest.raises(CodecError, match="does not fit"):
        loader.load(compact_codec._context, np.ones(n, dtype=np.int64), np.ones(n, dtype=np.uint64))
    with pytest.raises(CodecError, match="refused"):  # not reduced modulo q
        loader.load(compact_codec._context, np.full(n, compact_codec.q, dtype=np.uint64), np.ones(n, dtype=np.uint64))


def test_compact_context_refuses_an_encryption_path_that_does_not_decrypt(monkeypatch):
    """Loading a secret context encrypts, sums and decrypts a probe; a broken path is refused."""
    secret = crypto.generate_keys("compact").secret
    real = sampling.expand_seed
    calls = []

    def drifting(key, n, q, width):  # the decryptor would expand a different polynomial
        calls.append(key)
        u = real(key, n, q, width)
        return u if len(calls) <= 2 else (u + np.uint64(1)) % np.uint64(q)

    monkeypatch.setattr(compact, "expand_seed", drifting)
    with pytest.raises(CodecError, match="does not decrypt"):
        crypto.load_context(secret)
    monkeypatch.setattr(compact, "expand_seed", real)
    assert crypto.load_context(secret).has_secret_key


def test_compact_refuses_values_beyond_headroom():
    codec = crypto.load_context(crypto.generate_keys("compact").secret)
    with pytest.raises(crypto.UpdateOutOfRange, match="at most"):
        codec.encrypt_update(np.full(10, 10.0), int(codec.VALUE_LIMIT), io.BytesIO())


# --------------------------------------------------------------------------- keys and profiles


def test_compact_encrypts_with_the_secret_key_only():
    public = crypto.load_context(crypto.generate_keys("compact").public)
    with pytest.raises(CodecError, match="secret key"):
        public.encrypt_update(np.ones(4), 1, io.BytesIO())


def test_tampered_parameters_are_rejected():
    import msgpack

    pair = crypto.generate_keys("compact")
    payload = msgpack.unpackb(pair.public[len(crypto.KEY_MAGIC):])
    payload["params"]["scale_bits"] = 30
    with pytest.raises(CodecMismatch, match="parameters"):
        crypto.load_context(crypto.KEY_MAGIC + msgpack.packb(payload, use_bin_type=True))


def test_security_check_refuses_oversized_modulus():
    with pytest.raises(CodecError, match="128-bit"):
        sealio.check_security(1024, [60])
    sealio.check_security(8192, [56])


def test_absurd_header_claims_are_codec_errors(codecs):
    import msgpack

    secret, public = codecs
    for field, value in (("n_updates", 10**9), ("n_params", 10**15)):
        blob = bytearray(_encrypt(secret, np.ones(10), 1))
        header = public.read_header(io.BytesIO(bytes(blob)))
        fields = {"v": 1, "profile": header.profile, "fingerprint": header.fingerprint,
                  "n_params": header.n_params, "n_chunks": header.n_chunks, "n_updates": 1, field: value}
        body = msgpack.packb(fields)
        forged = crypto.UPDATE_MAGIC + len(body).to_bytes(4, "big") + body + b"\0" * 64
        with pytest.raises(CodecError):
            public.read_header(io.BytesIO(forged))


# --------------------------------------------------------------------------- parallel and threads


def test_compact_process_pool_round_trip():
    pair = crypto.generate_keys("compact")
    with crypto.load_context(pair.secret) as secret:
        public = crypto.load_context(pair.public)
        secret.workers = 2
        secret.parallel_min_params = 0
        n_params = 9 * secret.POLY_MODULUS_DEGREE + 5
        rng = np.random.default_rng(8)
        ws = [rng.uniform(-10, 10, n_params).astype(np.float32) for _ in range(2)]  # as Keras gives them
        blobs = [_encrypt(secret, w, 3) for w in ws]
        secret.workers = 1  # the same update encrypted in this process decrypts the same
        serial = _encrypt(secret, ws[0], 3)
        assert len(serial) == len(blobs[0])
        secret.workers = 2
        total = public.new_sum(n_params)
        for blob in blobs:
            total.add(io.BytesIO(blob))
        buf = io.BytesIO()
        total.write(buf)
        buf.seek(0)
        got = secret.decrypt_aggregate(buf, 6)  # decrypted through the pool too
        expected = (ws[0].astype(np.float64) + ws[1].astype(np.float64)) / 2
        assert np.max(np.abs(got - expected)) < 1e-6


def test_codec_shared_by_threads(codecs):
    from concurrent.futures import ThreadPoolExecutor

    secret, _ = codecs
    rng = np.random.default_rng(9)
    ws = [rng.uniform(-1, 1, 20_000) for _ in range(6)]

    def round_trip(w):
        return np.max(np.abs(secret.decrypt_update(io.BytesIO(_encrypt(secret, w, 1)), 1) - w))

    with ThreadPoolExecutor(3) as pool:
        errors = list(pool.map(round_trip, ws))
    assert max(errors) < 1e-6


# --------------------------------------------------------------------------- memory


def test_compact_sum_allocation_does_not_grow_with_updates():
    """Peak traced allocation while adding 20 updates is that of adding 2 (numpy is traced)."""
    import tracemalloc

    pair = crypto.generate_keys("compact")
    secret, public = crypto.load_context(pair.secret), crypto.load_context(pair.public)
    n_params = 40 * secret.POLY_MODULUS_DEGREE
    blob = _encrypt(secret, np.random.default_rng(10).uniform(-1, 1, n_params), 1)

    def peak_for(k):
        tracemalloc.start()
        try:
            total = public.new_sum(n_params, distinct_updates=False)  # the same upload k times
            for _ in range(k):
                total.add(io.BytesIO(blob))
            total.write(io.BytesIO())
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    two, twenty = peak_for(2), peak_for(20)
    # Only the seeds grow: 33 bytes per chunk per update (0.06% of an update), kept for the
    # decryptor. The sum, its staging copy and the read buffers are allocated once.
    seeds_per_update = secret.SEED_BYTES * secret.n_chunks(n_params)
    assert twenty - two <= 18 * (seeds_per_update + 512), (two, twenty)
    sum_bytes = 8 * n_params
    assert two < 2 * sum_bytes + 6 * secret.READ_BATCH * secret.frame_bytes(), two


@pytest.mark.parametrize("profile", PROFILES)
def test_aggregator_process_memory_is_flat(tmp_path, profile):
    """Peak RSS of a fresh aggregator process streaming 2 vs 12 update files from disk."""
    from cxr_mq import bench

    pair = crypto.generate_keys(profile)
    secret = crypto.load_context(pair.secret)
    (tmp_path / "public.ctx").write_bytes(pair.public)
    n_params = 60_000
    files = []
    for i in range(3):
        path = tmp_path / f"u{i}.bin"
        path.write_bytes(_encrypt(secret, np.random.default_rng(i).uniform(-1, 1, n_params), 1))
        files.append(path)
    update_mb = files[0].stat().st_size / 2**20
    runs = {k: bench._peak_rss(tmp_path / "public.ctx", [files[i % 3] for i in range(k)], n_params)
            for k in (2, 12)}
    growth = {k: run["peak_rss_mb"] - run["loaded_rss_mb"] for k, run in runs.items()}
    # holding 10 more updates would add 10 * update_mb
    assert growth[12] - growth[2] < max(2.0, 2 * update_mb), (growth, update_mb)


def test_codec_bench_runs_and_reports_every_figure():
    """``cxr-mq bench`` in miniature: every figure the issue asks for is present and sane."""
    from cxr_mq import bench

    n_params = 4 * crypto.CompactCodec.POLY_MODULUS_DEGREE
    result = bench.run_codec_bench(n_params, [2, 3], ("compact",), log=lambda *_: None)
    compact = result["profiles"]["compact"]
    for key in ("bytes_per_param", "encrypt_mparams_per_s_per_core", "aggregate_mparams_per_s_per_core",
                "aggregate_mparams_per_s", "max_abs_error", "aggregator_peak_rss_mb"):
        assert key in compact, key
    assert 7.0 < compact["bytes_per_param"] < 7.1
    assert compact["max_abs_error"] < 1e-6 and compact["aggregate_deterministic"] is True
    assert set(compact["aggregator_peak_rss_mb"]) == {"2", "3"}
    assert compact["encrypt_mparams_per_s_per_core"] > 0 and compact["aggregate_mparams_per_s_per_core"] > 0
    assert "encrypt_mparams_per_s_per_core" in bench.results_table(result)


# --------------------------------------------------------------------------- limits (issue 10: 3, 5, 6)


def _sum_bytes(total) -> bytes:
    out = io.BytesIO()
    total.write(out)
    return out.getvalue()


def _forged_stream(codec, **fields) -> bytes:
    """A stream whose header says what the attacker likes, followed by a few bytes."""
    import msgpack

    header = {"v": 1, "profile": codec.profile, "fingerprint": codec.fingerprint,
              "n_params": 100, "n_chunks": codec.n_chunks(100), "n_updates": 1, **fields}
    body = msgpack.packb(header)
    return crypto.UPDATE_MAGIC + len(body).to_bytes(4, "big") + body + b"\0" * 16


def test_an_upload_holding_two_updates_is_refused_and_the_sum_is_untouched(codecs):
    secret, public = codecs
    rng = np.random.default_rng(20)
    blobs = [_encrypt(secret, rng.uniform(-1, 1, 100), 1) for _ in range(3)]
    pair = public.new_sum(100)
    pair.add(io.BytesIO(blobs[0]))
    pair.add(io.BytesIO(blobs[1]))
    total = public.new_sum(100, max_updates=3)
    total.add(io.BytesIO(blobs[2]))
    before = _sum_bytes(total)
    with pytest.raises(CodecError, match="holds 2 updates, expected exactly 1"):
        total.add(io.BytesIO(_sum_bytes(pair)))
    assert total.count == 1 and _sum_bytes(total) == before


def test_a_sum_refuses_more_updates_than_the_round_takes(codecs):
    secret, public = codecs
    rng = np.random.default_rng(21)
    total = public.new_sum(100, max_updates=2)
    for _ in range(2):
        total.add(io.BytesIO(_encrypt(secret, rng.uniform(-1, 1, 100), 1)))
    with pytest.raises(CodecError, match="at most 2 updates"):
        total.add(io.BytesIO(_encrypt(secret, rng.uniform(-1, 1, 100), 1)))
    assert total.count == 2


def test_a_153_byte_upload_claiming_2_20_updates_is_refused_before_allocating(codecs):
    """Before: the header's count sized the read buffers and seed arrays (529 MB)."""
    import tracemalloc

    _, public = codecs
    forged = _forged_stream(public, n_updates=1 << 20)
    assert len(forged) < 200
    total = public.new_sum(100)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=f"holds {1 << 20} updates, expected exactly 1"):
            total.add(io.BytesIO(forged))
        with pytest.raises(CodecError, match="expected 3"):  # a decryptor told the contributors
            codecs[0].decrypt_aggregate(io.BytesIO(forged), 10, n_updates=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    with pytest.raises(CodecError, match="out of range"):  # beyond any round, whatever the caller says
        public.read_header(io.BytesIO(_forged_stream(public, n_updates=(1 << 20) + 1)))


def test_huge_frame_lengths_are_refused_without_reading_them(codecs):
    secret, public = codecs
    blob = bytearray(_encrypt(secret, np.ones(100), 1))
    header_len = len(blob) - (len(blob) - len(_forged_stream(public)) + 16)  # magic + header frame
    assert blob[header_len:header_len + 4] == len(blob[header_len + 4:]).to_bytes(4, "big")
    blob[header_len:header_len + 4] = b"\xff\xff\xff\xff"
    with pytest.raises(CodecError, match="4294967295 bytes"):
        public.new_sum(100).add(io.BytesIO(bytes(blob)))
    forged = crypto.UPDATE_MAGIC + b"\xff\xff\xff\xff" + b"\0" * 64  # the header frame itself
    with pytest.raises(CodecError, match="more than the limit"):
        public.read_header(io.BytesIO(forged))


def test_compact_refuses_repeated_seed_records(compact_codec):
    codec = compact_codec
    n = codec.POLY_MODULUS_DEGREE
    blob = bytearray(_encrypt(codec, np.random.default_rng(22).uniform(-1, 1, 2 * n), 1))
    frame = codec.frame_bytes()
    first = len(blob) - 2 * frame
    seed = blob[first + 4 : first + 4 + codec.SEED_BYTES]
    twice = bytearray(blob)
    twice[first + frame + 4 : first + frame + 4 + codec.SEED_BYTES] = seed  # chunk 1 reuses chunk 0's seed
    total = codec.new_sum(2 * n)
    with pytest.raises(CodecError, match="appears twice"):
        total.add(io.BytesIO(bytes(twice)))
    assert total.count == 0
    total.add(io.BytesIO(bytes(blob)))
    with pytest.raises(CodecError, match="in the sum already"):  # the same encryption again
        total.add(io.BytesIO(bytes(blob)))
    assert total.count == 1


def test_an_aggregate_is_checked_against_its_contributors_before_decrypting(compact_codec):
    """One hospital's update summed three times would decrypt to 3x that update: refused."""
    codec = compact_codec
    n = codec.POLY_MODULUS_DEGREE
    w = np.random.default_rng(23).uniform(-1, 1, 2 * n)
    blob = _encrypt(codec, w, 1)
    copies = codec.new_sum(2 * n, distinct_updates=False)
    for _ in range(3):
        copies.add(io.BytesIO(blob))
    aggregate = _sum_bytes(copies)
    calls = []
    real = codec.decrypt_chunks
    codec.decrypt_chunks = lambda *a: calls.append(a) or real(*a)
    try:
        with pytest.raises(CodecError, match="appears twice"):
            codec.decrypt_aggregate(io.BytesIO(aggregate), 3, n_updates=3)
        assert calls == []  # refused before any chunk was decrypted
    finally:
        del codec.decrypt_chunks
    with pytest.raises(CodecError, match="sums 3 updates, expected 2"):
        codec.decrypt_aggregate(io.BytesIO(aggregate), 3, n_updates=2)
    with pytest.raises(CodecError, match="fewer than the minimum of 3"):
        codec.decrypt_aggregate(io.BytesIO(blob), 1, min_updates=3)


@pytest.mark.parametrize("k", [1, 9, 200])
def test_updates_at_the_limit_of_k_contributors_sum_without_wrapping(codecs, k):
    """k updates at exactly update_limit(k), all one sign, decrypt to their sum; a hair more is
    refused before encrypting. Before, 9 updates near the old per-update limit wrapped."""
    secret, public = codecs
    n_params = 64
    limit = secret.update_limit(k)
    assert limit > 0
    w = np.full(n_params, limit)
    w[1::2] = -limit
    blob = _encrypt(secret, w, 1, max_contributors=k)
    total = public.new_sum(n_params, max_updates=k, distinct_updates=False)  # k copies: same bound
    for _ in range(k):
        total.add(io.BytesIO(blob))
    got = secret.decrypt_aggregate(io.BytesIO(_sum_bytes(total)), 1) if secret.profile == "seed" else None
    if got is None:
        # compact refuses copies when decrypting (distinct seeds): encrypt k fresh ones
        total = public.new_sum(n_params, max_updates=k)
        for _ in range(k):
            total.add(io.BytesIO(_encrypt(secret, w, 1, max_contributors=k)))
        got = secret.decrypt_aggregate(io.BytesIO(_sum_bytes(total)), 1, n_updates=k)
    assert np.max(np.abs(got - k * w)) <= k * secret.precision(k)
    with pytest.raises(crypto.UpdateOutOfRange, match=f"at most {k} contributors"):
        secret.encrypt_update(w * (1 + 1e-6), 1, io.BytesIO(), max_contributors=k)


def test_the_issues_wrapping_sum_is_refused_before_encrypting(compact_codec):
    """200 hospitals x 100,000 samples x |w| = 10 decrypted to garbage; now refused (the seed
    profile's modulus holds 2^90: it takes such a sum)."""
    secret = compact_codec
    out = io.BytesIO()
    with pytest.raises(crypto.UpdateOutOfRange, match="at most 200 contributors"):
        secret.encrypt_update(np.full(10, 10.0), 100_000, out, max_contributors=200)
    assert out.getvalue() == b""  # nothing was written
    secret.encrypt_update(np.full(10, 10.0), 100_000, io.BytesIO(), max_contributors=10)


def test_decrypted_values_carry_no_noise(codecs):
    """Two encryptions of the same updates decrypt to identical values (the noise differs,
    so it is gone), within the stated precision, and on the grid."""
    secret, public = codecs
    rng = np.random.default_rng(24)
    n_params, counts = 9000, [3, 50, 7]
    ws = [rng.uniform(-5, 5, n_params) for _ in counts]
    results, blobs = [], []
    for _ in range(2):
        total = public.new_sum(n_params, max_updates=3)
        for w, n in zip(ws, counts):
            blobs.append(_encrypt(secret, w, n, max_contributors=3))
            total.add(io.BytesIO(blobs[-1]))
        results.append(secret.decrypt_aggregate(io.BytesIO(_sum_bytes(total)), sum(counts), n_updates=3))
    assert blobs[0] != blobs[3]  # fresh randomness each time
    assert np.array_equal(results[0], results[1])
    expected = sum(n * w for w, n in zip(ws, counts)) / sum(counts)
    assert np.max(np.abs(results[0] - expected)) <= 3 * secret.precision(3) / sum(counts)
    total = public.new_sum(n_params, max_updates=3)
    for blob in blobs[:3]:
        total.add(io.BytesIO(blob))
    steps = secret.decrypt_aggregate(io.BytesIO(_sum_bytes(total)), 1) / secret.grid(3)
    assert np.array_equal(steps, np.rint(steps))  # whole steps of the grid: no noise below it
    single = [secret.decrypt_update(io.BytesIO(blobs[i]), counts[0]) for i in (0, 3)]
    assert np.array_equal(single[0], single[1])

"""The threshold profile's math and codec, in process: ring primitives, fresh-key encryption
of updates, the aggregator's sum, decryption with the round key sum, the encoding's limits."""
from __future__ import annotations

import io

import numpy as np
import pytest

from cxr_mq import crypto
from cxr_mq.crypto import ceremony, keylayer, ring
from cxr_mq.crypto.threshold import (
    CHECK_COEFFS,
    RoundEncoding,
    ThresholdCodec,
    ThresholdCodecError,
)

PARTIES = ("h1", "h2", "h3", "h4", "h5")


@pytest.fixture(scope="module")
def committee():
    params = ceremony.CeremonyParams("fed", PARTIES, 3, "test-ceremony")
    public_key, shares = ceremony.run_local(params)
    codec = ThresholdCodec(public_key, federation="fed", parties=PARTIES, threshold=3)
    return codec, shares


def _encrypt(codec, weights, n, encoding, hospital):
    """The stream bytes and the round key (read back from a wrapped sampler)."""
    buf = io.BytesIO()
    key_ct = codec.encrypt_update(weights, n, buf, encoding=encoding, hospital=hospital)
    return buf.getvalue(), key_ct


def _key_sum(shares, key_ct, active=("h1", "h2", "h3")):
    """The committee's decryption of a key ciphertext sum, as the library does it."""
    from cxr_mq.crypto import committee as cm

    r = keylayer.key_ring()
    params = shares[active[0]].params
    points = [params.point(p) for p in active]
    plain = key_ct.c[:, 0]
    for party in active:
        lam = cm.lagrange_at_zero(points, params.point(party), r.modulus)
        plain = r.add(plain, r.mul(r.scalar(shares[party].sigma, lam), key_ct.c[:, 1]))
    return keylayer.decode_key_sum(plain, max_abs=len(key_ct.contributors))


# --------------------------------------------------------------------------- ring


def test_ntt_multiply_is_the_negacyclic_product():
    n = 64
    q = ring.ntt_primes(n, 32, 1)[0]
    r = ring.NttRing(n, q)
    rng = np.random.default_rng(1)
    a, b = rng.integers(-50, 50, n), rng.integers(-50, 50, n)
    full = np.convolve(a, b)
    expected = full[:n].copy()
    expected[: n - 1] -= full[n:]  # X^n = -1
    assert np.array_equal(r.centered(r.multiply(r.from_signed(a), r.from_signed(b))), expected)
    x = rng.integers(0, q, (3, n)).astype(np.uint64)
    assert np.array_equal(r.inverse(r.forward(x)), x)


def test_rns_lift_and_public_expansion():
    kr = keylayer.key_ring()
    rng = np.random.default_rng(2)
    values = [int(v) for v in rng.integers(-(1 << 62), 1 << 62, kr.n)]
    values = [v * (1 << 29) + 12345 for v in values]  # beyond int64: the lift is exact on Python ints
    residues = np.stack([np.array([v % q for v in values], dtype=np.uint64) for q in kr.primes])
    assert [int(v) for v in kr.centered(residues)] == values
    seed = ring.public_seed("test", "fed", 1)
    rows = ring.expand_uniform_rows(seed, 5, 3, 256, 3221225473)  # q = 0.75 * 2^32: every row takes the rejection path
    for i in range(3):
        assert np.array_equal(rows[i], ring.expand_uniform(seed, (1 << 63) + 5 + i, 256, 3221225473))
        alone = ring.expand_uniform_rows(seed, 5 + i, 1, 256, 3221225473)[0]
        assert np.array_equal(alone, rows[i])
    assert rows.max() < 3221225473 and not np.array_equal(rows[0], rows[1])
    big_q = (1 << 32) - 5  # almost no rejections: rows come straight from one keystream
    assert np.array_equal(ring.expand_uniform_rows(seed, 0, 4, 256, big_q)[2],
                          ring.expand_uniform_rows(seed, 2, 1, 256, big_q)[0])
    assert ring.public_seed("test", "fed", 1) != ring.public_seed("test", "fed", 2)


def test_secret_samplers_are_in_range_and_fresh():
    s = ring.sample_ternary(4096)
    assert set(np.unique(s)) == {-1, 0, 1}
    assert not np.array_equal(s, ring.sample_ternary(4096))
    wide = ring.sample_wide_uniform(4096, 40)
    assert np.abs(wide).max() <= 1 << 40 and np.abs(wide).max() > 1 << 38
    kr = keylayer.key_ring()
    smudge = np.array(kr.centered(kr.wide_uniform(keylayer.SMUDGING_BITS)), dtype=object)
    top = max(abs(int(v)) for v in smudge)
    assert keylayer.SMUDGING_BITS >= 40 and (1 << (keylayer.SMUDGING_BITS - 2)) < top <= 1 << keylayer.SMUDGING_BITS


# --------------------------------------------------------------------------- codec


def test_fedavg_through_fresh_keys_and_the_key_sum(committee):
    codec, shares = committee
    enc = RoundEncoding("fed", 7, max_contributors=10, max_samples=100_000, weight_bound=10.0)
    rng = np.random.default_rng(3)
    params, counts = 10_000, [100_000, 1, 99_999, 50_000]
    weights = [rng.uniform(-10, 10, params) for _ in counts]
    total = codec.new_sum(params)
    for hospital, w, n in zip(PARTIES, weights, counts):
        stream, _ = _encrypt(codec, w, n, enc, hospital)
        total.add(io.BytesIO(stream))
    out = io.BytesIO()
    total.write(out)
    key_sum = codec.key_sum_of(io.BytesIO(out.getvalue()))
    assert key_sum.contributors == PARTIES[:4]
    s_sum = _key_sum(shares, key_sum)
    avg, samples = codec.decrypt_aggregate(io.BytesIO(out.getvalue()), s_sum, n_updates=4, min_updates=3)
    expected = sum(w * n for w, n in zip(weights, counts)) / sum(counts)
    with pytest.raises(ThresholdCodecError, match="fewer than the minimum of 5"):
        codec.decrypt_aggregate(io.BytesIO(out.getvalue()), s_sum, min_updates=5)
    with pytest.raises(ThresholdCodecError, match="expected 3"):
        codec.decrypt_aggregate(io.BytesIO(out.getvalue()), s_sum, n_updates=3)
    assert samples == sum(counts)
    # This profile keeps the noise: 4 updates' centered binomial noise (sd 6.5 units of 1/scale,
    # scale 2.1e7) times 100,000 / 250,000 samples. Over 10,000 parameters the worst was 5.3e-7;
    # 1e-6 is 52 units, 8 sd: about 1e-11 per run. A wrong key sum or a lost update is off by ~|w|.
    assert np.max(np.abs(avg - expected)) < 1e-6


def test_stream_is_four_bytes_per_parameter_plus_one_key_ciphertext(committee):
    codec, _ = committee
    enc = RoundEncoding("fed", 1, 10, 1000, 4.0)
    params = 3 * 4096 + 5  # the last chunk is cut where the coefficients end
    stream, key_ct = _encrypt(codec, np.zeros(params), 3, enc, "h1")
    key_bytes = len(key_ct.to_bytes())
    assert key_bytes <= 130_000
    chunk_bytes = 4 * (params + enc.limbs + CHECK_COEFFS)
    header_bytes = len(stream) - key_bytes - chunk_bytes
    assert 0 < header_bytes < 400
    # the sample count is in no header: two counts give headers of equal bytes
    other, _ = _encrypt(codec, np.zeros(params), 999, enc, "h1")
    assert stream[:header_bytes] == other[:header_bytes]


def test_fresh_key_and_noise_every_encryption(committee):
    codec, _ = committee
    enc = RoundEncoding("fed", 1, 10, 1000, 4.0)
    w = np.ones(5000)
    a, ka = _encrypt(codec, w, 10, enc, "h1")
    b, kb = _encrypt(codec, w, 10, enc, "h1")
    assert a != b and not np.array_equal(ka.c, kb.c)


def test_worst_case_sum_of_max_contributors_does_not_wrap(committee):
    codec, shares = committee
    k = 5
    enc = RoundEncoding("fed", 2, max_contributors=k, max_samples=1000, weight_bound=3.0)
    w = np.full(4100, 3.0)
    w[::2] = -3.0
    total = codec.new_sum(w.size)
    for hospital in PARTIES[:k]:
        total.add(io.BytesIO(_encrypt(codec, w, 1000, enc, hospital)[0]))
    out = io.BytesIO()
    total.write(out)
    agg = out.getvalue()
    avg, samples = codec.decrypt_aggregate(io.BytesIO(agg), _key_sum(shares, codec.key_sum_of(io.BytesIO(agg))))
    assert samples == k * 1000
    assert np.max(np.abs(avg - w)) < 1e-6
    # a sixth update would pass the bound: the sum refuses it, and is left as it was
    with pytest.raises(ThresholdCodecError, match="exceeds the round's 5 contributors"):
        total.add(io.BytesIO(_encrypt(codec, w, 1000, enc, "h1")[0]))
    again = io.BytesIO()
    total.write(again)
    assert again.getvalue() == agg


def test_encoding_refuses_what_could_wrap(committee):
    codec, _ = committee
    enc = RoundEncoding("fed", 3, 10, 1000, 4.0)
    with pytest.raises(ThresholdCodecError, match="weight_bound"):
        codec.encrypt_update(np.array([4.5, 0.0]), 5, io.BytesIO(), encoding=enc, hospital="h1")
    with pytest.raises(ThresholdCodecError, match="max_samples"):
        codec.encrypt_update(np.zeros(3), 1001, io.BytesIO(), encoding=enc, hospital="h1")
    with pytest.raises(ThresholdCodecError, match="scale"):
        RoundEncoding("fed", 3, 1024, 1000, 100.0)  # K * W leaves too little precision
    with pytest.raises(ThresholdCodecError, match="encrypts for one round"):  # a single-key caller
        codec.encrypt_update(np.zeros(3), 5, io.BytesIO(), max_contributors=3)
    with pytest.raises(ThresholdCodecError, match="NaN"):
        codec.encrypt_update(np.array([np.nan]), 5, io.BytesIO(), encoding=enc, hospital="h1")


def test_sum_refuses_mixed_rounds_and_bad_streams_without_changing(committee):
    codec, _ = committee
    r4 = RoundEncoding("fed", 4, 10, 1000, 4.0)
    r5 = RoundEncoding("fed", 5, 10, 1000, 4.0)
    w = np.linspace(-1, 1, 5000)
    first, _ = _encrypt(codec, w, 10, r4, "h1")
    total = codec.new_sum(w.size)
    total.add(io.BytesIO(first))
    before = io.BytesIO()
    total.write(before)
    bad = [
        (_encrypt(codec, w, 10, r5, "h2")[0], "another round"),
        (_encrypt(codec, w, 10, r4, "h2")[0][:-4], "truncated"),
        (_encrypt(codec, w, 10, r4, "h2")[0] + b"\0", "trailing"),
        (_encrypt(codec, w[:100], 10, r4, "h2")[0], "n_params mismatch"),
    ]
    for stream, reason in bad:
        with pytest.raises(ThresholdCodecError, match=reason):
            total.add(io.BytesIO(stream))
    forged = bytearray(_encrypt(codec, w, 10, r4, "h2")[0])
    forged[-4:] = (0xFFFFFFFF).to_bytes(4, "little")  # a coefficient >= q
    with pytest.raises(ThresholdCodecError, match="not reduced"):
        total.add(io.BytesIO(bytes(forged)))
    after = io.BytesIO()
    total.write(after)
    assert after.getvalue() == before.getvalue() and total.count == 1


def test_other_committee_streams_are_refused(committee):
    codec, _ = committee
    other_pk, _ = ceremony.run_local(ceremony.CeremonyParams("fed", PARTIES, 3, "another"))
    other = ThresholdCodec(other_pk, federation="fed", parties=PARTIES, threshold=3)
    enc = RoundEncoding("fed", 1, 10, 1000, 4.0)
    stream, _ = _encrypt(other, np.zeros(10), 1, enc, "h1")
    with pytest.raises(ThresholdCodecError, match="committee key mismatch"):
        codec.new_sum(10).add(io.BytesIO(stream))


def test_sum_is_byte_identical_in_any_order(committee):
    codec, _ = committee
    enc = RoundEncoding("fed", 6, 10, 1000, 4.0)
    streams = [_encrypt(codec, np.full(3000, i / 3), 5 + i, enc, h)[0] for i, h in enumerate(PARTIES[:3])]
    outs = []
    for order in ([0, 1, 2], [2, 0, 1]):
        total = codec.new_sum(3000)
        for i in order:
            total.add(io.BytesIO(streams[i]))
        buf = io.BytesIO()
        total.write(buf)
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]


def test_a_key_sum_that_leaves_out_a_contributor_does_not_decrypt(committee):
    codec, shares = committee
    enc = RoundEncoding("fed", 8, 10, 1000, 4.0)
    keys, total = [], codec.new_sum(2000)
    for i, hospital in enumerate(PARTIES[:3]):
        stream, key_ct = _encrypt(codec, np.full(2000, 0.5), 10, enc, hospital)
        total.add(io.BytesIO(stream))
        keys.append(key_ct)
    out = io.BytesIO()
    total.write(out)
    partial_sum = _key_sum(shares, keylayer.sum_key_ciphertexts(keys[:2]))
    with pytest.raises(ThresholdCodecError, match="does not decrypt"):
        codec.decrypt_aggregate(io.BytesIO(out.getvalue()), np.clip(partial_sum, -3, 3))


def test_public_context_round_trips_through_the_profile_registry(committee):
    codec, _ = committee
    loaded = crypto.load_context(codec.public_bytes())
    assert isinstance(loaded, ThresholdCodec) and loaded.fingerprint == codec.fingerprint
    assert not loaded.has_secret_key
    loaded.require_public_only()
    with pytest.raises(crypto.CodecError, match="ceremony"):
        crypto.generate_keys("threshold")


def test_bench_reports_the_threshold_figures():
    """``cxr-mq bench`` in miniature for the threshold profile: every figure of the issue."""
    from cxr_mq import bench

    result = bench.run_codec_bench(3 * 4096, [2, 12], ("threshold",), log=lambda *_: None)
    th = result["profiles"]["threshold"]
    assert th["chunk_bytes_per_param"] == 4.0
    assert 65_000 < th["key_ciphertext_bytes"] <= th["per_round_overhead_bytes"] <= 130_000
    assert th["max_abs_error"] < 1e-6 and th["max_abs_error_total_10"] < 1e-6
    assert th["decrypted_total_samples_exact"] and th["aggregate_deterministic"]
    assert set(th["aggregator_peak_rss_mb"]) == {"2", "12"}  # more senders than the committee
    assert th["committee_cpu_seconds"] > 0 and th["decrypt_mparams_per_cpu_s"] > 0
    targets = result["targets"]
    for key in ("threshold_chunk_bytes_per_param", "threshold_per_round_overhead_bytes",
                "threshold_max_abs_error", "threshold_aggregator_memory_flat"):
        assert targets[key] is True, key
    assert "committee_cpu_seconds" in bench.results_table(result)

"""The ceremony and the committee, in process, played by an attacker where it matters:
t of n decrypt a round's key sum, t-1 do not; a hospital with all it holds and every stored
object cannot read another hospital's update; the committee refuses what it must."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest

from cxr_mq import identity
from cxr_mq.crypto import ceremony, committee, keylayer, ring
from cxr_mq.crypto.ceremony import CeremonyError, CeremonyParams
from cxr_mq.crypto.committee import CommitteeRefusal, DecryptionRequest, KeyUpload, Ledger
from cxr_mq.crypto.threshold import RoundEncoding, ThresholdCodec

PARTIES = ("h1", "h2", "h3", "h4", "h5")
T = 3


class Federation:
    """A ceremony run party by party (shares sealed to X25519 identities), and a round."""

    def __init__(self):
        self.ids = {p: identity.Identity.generate(p) for p in PARTIES}
        self.registry = identity.Registry(entries=[
            identity.PublicIdentity(p, i.public.ed25519, i.public.x25519, "hospital") for p, i in self.ids.items()])
        self.params = CeremonyParams("fed", PARTIES, T, "ceremony-1")
        contributions, sealed = [], {}
        self.dealt = {}
        for dealer in PARTIES:
            contribution, shares = ceremony.generate_share(self.params, dealer)
            contributions.append(contribution)
            self.dealt[dealer] = shares  # what the dealer knew (the attack test uses it)
            for recipient, share in shares.items():
                recipient_key = self.registry.get(recipient).x25519
                sealed[(dealer, recipient)] = ceremony.seal(recipient_key, share.to_bytes(), share.aad())
        self.sealed = sealed
        self.public_key = ceremony.finalize(self.params, contributions)
        self.shares = {}
        for me in PARTIES:
            received = [ceremony.DealtShare.from_bytes(ceremony.unseal(
                self.ids[me].agreement_key, sealed[(dealer, me)], ceremony.share_aad("ceremony-1", dealer, me)))
                for dealer in PARTIES]
            self.shares[me] = ceremony.aggregate_shares(self.params, me, received, self.public_key)
        self.codec = ThresholdCodec(self.public_key, federation="fed", parties=PARTIES, threshold=T)

    def round(self, round_no: int, hospitals=PARTIES[:4], params: int = 5000):
        """Every hospital's stream, signed key upload and round key; the aggregate."""
        enc = RoundEncoding("fed", round_no, 10, 1000, 4.0)
        rng = np.random.default_rng(round_no)
        out = {"weights": {}, "streams": {}, "uploads": {}, "keys": {}}
        total = self.codec.new_sum(params)
        for h in hospitals:
            w = rng.uniform(-1, 1, params)
            buf = io.BytesIO()
            key_ct = self.codec.encrypt_update(w, 900, buf, encoding=enc, hospital=h)
            blob = key_ct.to_bytes()
            message = committee.round_key_message("fed", round_no, h, blob, time.time())
            out["uploads"][h] = KeyUpload(h, blob, identity.sign(message, self.ids[h]))
            out["weights"][h], out["streams"][h], out["keys"][h] = w, buf.getvalue(), self.open_key(key_ct)
            total.add(io.BytesIO(buf.getvalue()))
        agg = io.BytesIO()
        total.write(agg)
        out["aggregate"] = agg.getvalue()
        out["key_sum"] = self.codec.key_sum_of(io.BytesIO(out["aggregate"]))
        out["contributors"] = tuple(sorted(hospitals))
        return out

    def open_key(self, key_ct) -> np.ndarray:
        """The round key in one key ciphertext, opened by t shares directly (the test's
        ground truth; the committee itself never decrypts a single upload)."""
        r = keylayer.key_ring()
        active = PARTIES[:T]
        points = [self.params.point(p) for p in active]
        plain = key_ct.c[:, 0]
        for p in active:
            lam = committee.lagrange_at_zero(points, self.params.point(p), r.modulus)
            plain = r.add(plain, r.mul(r.scalar(self.shares[p].sigma, lam), key_ct.c[:, 1]))
        return keylayer.decode_key_sum(plain, max_abs=1)

    def request(self, rnd, round_no, active=("h1", "h2", "h3"), **changes) -> DecryptionRequest:
        fields = dict(federation="fed", round=round_no, contributors=rnd["contributors"], key_sum=rnd["key_sum"],
                      uploads=tuple(rnd["uploads"][h] for h in rnd["contributors"]), active=active)
        fields.update(changes)
        return DecryptionRequest(**fields)

    def decrypt(self, request, ledgers, min_clients=3):
        verify = committee.signed_upload_verifier(self.registry)
        partials = [committee.partial_decrypt(self.shares[j], request, min_clients=min_clients, verify=verify,
                                              ledger=ledgers[j]) for j in request.active]
        return committee.combine(request, partials)


@pytest.fixture(scope="module")
def fed():
    return Federation()


@pytest.fixture()
def ledgers(tmp_path):
    return {p: Ledger(tmp_path / p) for p in PARTIES}


def test_any_t_of_n_decrypt_the_key_sum_and_the_model(fed, ledgers, tmp_path):
    rnd = fed.round(1)
    expected = sum(rnd["keys"].values())
    s_sum = fed.decrypt(fed.request(rnd, 1, active=("h1", "h2", "h3")), ledgers)
    assert np.array_equal(s_sum, expected)
    # another active set (h1..h3 gone: fresh ledgers for the others) gets the same key sum
    others = {p: Ledger(tmp_path / "second" / p) for p in PARTIES}
    assert np.array_equal(fed.decrypt(fed.request(rnd, 1, active=("h2", "h4", "h5")), others), expected)
    avg, total = fed.codec.decrypt_aggregate(io.BytesIO(rnd["aggregate"]), s_sum)
    assert total == 3600
    assert np.max(np.abs(avg - np.mean(list(rnd["weights"].values()), axis=0))) < 1e-6


def test_t_minus_one_shares_do_not_decrypt(fed):
    rnd = fed.round(2)
    r = keylayer.key_ring()
    for subset in (("h1", "h2"), ("h3", "h5"), ("h4",)):
        points = [fed.params.point(p) for p in subset]
        plain = rnd["key_sum"].c[:, 0]
        for p in subset:
            lam = committee.lagrange_at_zero(points, fed.params.point(p), r.modulus)
            plain = r.add(plain, r.mul(r.scalar(fed.shares[p].sigma, lam), rnd["key_sum"].c[:, 1]))
        with pytest.raises(keylayer.KeyLayerError, match="do not decrypt"):
            keylayer.decode_key_sum(plain, max_abs=4)
    # and combine refuses a partial set outright
    request = fed.request(rnd, 2)
    partial = committee.partial_decrypt(fed.shares["h1"], request, min_clients=3,
                                        verify=committee.signed_upload_verifier(fed.registry),
                                        ledger=Ledger(ledger_dir := __import__("tempfile").mkdtemp()))
    with pytest.raises(keylayer.KeyLayerError, match="active set"):
        committee.combine(request, [partial])
    assert ledger_dir


def _attempt_round_key(codec, stream: bytes, candidate: np.ndarray, truth: np.ndarray, encoding) -> float:
    """Decrypt the first chunk of ``stream`` with ``candidate`` as its round key (exact NTT
    arithmetic, any coefficients) and return the worst error against the true plaintext."""
    q, n = codec.q, codec.n
    header, _ = codec.read_prefix(src := io.BytesIO(stream))
    c0 = codec.read_coefficients(src, header, 0, n)
    nr = ring.NttRing(n, q)
    a = nr.from_signed(ring.expand_uniform(encoding.seed(), 0, n, q).astype(np.int64))
    cand = nr.from_signed(np.mod(candidate, q).astype(np.int64))
    got = nr.centered(nr.add(c0, nr.multiply(a, cand)))
    want = np.rint(truth[:n] * (900 / encoding.max_samples) * encoding.scale)
    return float(np.max(np.abs(got - want)))


def test_a_hospital_with_all_it_holds_cannot_read_another_update(fed):
    rnd = fed.round(3)
    enc = RoundEncoding("fed", 3, 10, 1000, 4.0)
    me, victim = "h1", "h2"
    r = keylayer.key_ring()
    # everything h1 holds: its committee share, every share it dealt and received, its round key
    held = [fed.shares[me].sigma] + [s.value for s in fed.dealt[me].values()]
    held += [fed.dealt[d][me].value for d in PARTIES]
    for subset in [("h1", "h2", "h3"), ("h1", "h4", "h5"), ("h1", "h3", "h5")]:
        points = [fed.params.point(p) for p in subset]
        held.append(r.scalar(fed.shares[me].sigma, committee.lagrange_at_zero(points, fed.params.point(me), r.modulus)))
    victim_key = keylayer.KeyCiphertext.from_bytes(rnd["uploads"][victim].blob)
    for secret in held:  # as the committee secret on the victim's key ciphertext (and the sum)
        for target in (victim_key, rnd["key_sum"]):
            plain = r.add(target.c[:, 0], r.mul(secret, target.c[:, 1]))
            with pytest.raises(keylayer.KeyLayerError):
                keylayer.decode_key_sum(plain, max_abs=4)
    # as the victim's round key on its stream: its own key, and every share's coefficients
    candidates = [rnd["keys"][me], -rnd["keys"][me]] + [r.centered(r.inverse(s)) for s in held]
    noise_bound = 30
    truth = rnd["weights"][victim]
    assert _attempt_round_key(fed.codec, rnd["streams"][victim], rnd["keys"][victim], truth, enc) < noise_bound
    for candidate in candidates:
        assert _attempt_round_key(fed.codec, rnd["streams"][victim], candidate, truth, enc) > 1e6
    # the aggregate minus its own stream is not the victim's stream under any held key either
    for candidate in candidates[:2]:
        assert _attempt_round_key(fed.codec, rnd["aggregate"], candidate, truth, enc) > 1e6


def test_committee_refuses_a_second_decryption_in_a_round(fed, ledgers):
    rnd = fed.round(4, hospitals=PARTIES)
    verify = committee.signed_upload_verifier(fed.registry)
    first = fed.request(rnd, 4)
    partial = committee.partial_decrypt(fed.shares["h1"], first, min_clients=3, verify=verify, ledger=ledgers["h1"])
    # the same request redelivered: the same answer, no new smudging sample
    again = committee.partial_decrypt(fed.shares["h1"], first, min_clients=3, verify=verify, ledger=ledgers["h1"])
    assert np.array_equal(again.h, partial.h)
    # a key sum without h5 (as if the aggregator dropped it): would reveal h5 with the first
    fewer = fed.round(4, hospitals=PARTIES[:4])
    with pytest.raises(CommitteeRefusal, match="already took part"):
        committee.partial_decrypt(fed.shares["h1"], fed.request(fewer, 4), min_clients=3, verify=verify,
                                  ledger=ledgers["h1"])
    with pytest.raises(CommitteeRefusal, match="already took part"):
        committee.partial_decrypt(fed.shares["h1"], fed.request(rnd, 4, active=("h1", "h4", "h5")),
                                  min_clients=3, verify=verify, ledger=ledgers["h1"])


def test_committee_refuses_a_key_sum_that_leaves_out_or_adds_a_contributor(fed, ledgers):
    rnd = fed.round(5, hospitals=PARTIES[:4])
    verify = committee.signed_upload_verifier(fed.registry)

    def refused(request, match, min_clients=3):
        with pytest.raises(CommitteeRefusal, match=match):
            committee.partial_decrypt(fed.shares["h2"], request, min_clients=min_clients, verify=verify,
                                      ledger=ledgers["h2"])

    uploads = tuple(rnd["uploads"][h] for h in rnd["contributors"])
    # left out: the contributors name h4 but no upload of h4 is given
    refused(fed.request(rnd, 5, uploads=uploads[:3]), r"missing \['h4'\]")
    # added: an upload of a hospital that is not a contributor
    extra = fed.round(5, hospitals=("h5",))["uploads"]["h5"]
    refused(fed.request(rnd, 5, uploads=uploads + (extra,)), r"not contributors \['h5'\]")
    # the key sum is of three while the request claims four (the aggregator left h4 out of it)
    three = keylayer.sum_key_ciphertexts([keylayer.KeyCiphertext.from_bytes(u.blob) for u in uploads[:3]])
    refused(fed.request(rnd, 5, key_sum=three), "not the sum")
    # a key sum that adds a fifth key nobody signed for
    five = keylayer.sum_key_ciphertexts([rnd["key_sum"], keylayer.KeyCiphertext.from_bytes(extra.blob)])
    refused(fed.request(rnd, 5, key_sum=five), "not the sum")
    # the right labels, but h4's key replaced by one the aggregator made up (it knows pk)
    made_up = keylayer.encrypt_round_key(fed.public_key, ring.sample_ternary(4096), federation="fed",
                                         round_no=5, hospital="h4")
    relabelled = keylayer.sum_key_ciphertexts([three, made_up])
    assert relabelled.contributors == rnd["key_sum"].contributors
    refused(fed.request(rnd, 5, key_sum=relabelled), "not the sum")
    # an upload whose bytes were swapped for another hospital's key (its signature names other bytes)
    swapped = KeyUpload("h4", rnd["uploads"]["h3"].blob, rnd["uploads"]["h4"].signed)
    refused(fed.request(rnd, 5, uploads=uploads[:3] + (swapped,)), "not the object")
    # a forged signature, and one by another hospital
    forged = dict(rnd["uploads"]["h4"].signed, signature="00" * 64)
    refused(fed.request(rnd, 5, uploads=uploads[:3] + (KeyUpload("h4", uploads[3].blob, forged),)), "bad signature")
    by_other = identity.sign(dict(rnd["uploads"]["h4"].signed), fed.ids["h3"])
    refused(fed.request(rnd, 5, uploads=uploads[:3] + (KeyUpload("h4", uploads[3].blob, by_other),)), "signed by")
    # an upload replayed from another round
    old = fed.round(1, hospitals=("h4",))["uploads"]["h4"]
    refused(fed.request(rnd, 5, uploads=uploads[:3] + (old,)), "round 1")
    # fewer than min_clients, and a min_clients below the floor
    refused(fed.request(rnd, 5), "fewer than min_clients 5", min_clients=5)
    refused(fed.request(rnd, 5), "below the floor", min_clients=2)
    # an active set that is not t members, or does not include this member
    refused(fed.request(rnd, 5, active=("h2", "h3")), "not 3 distinct")
    refused(fed.request(rnd, 5, active=("h1", "h3", "h4")), "not in the active set")
    # after all those refusals the honest request still goes through (nothing was recorded)
    assert np.array_equal(fed.decrypt(fed.request(rnd, 5, active=("h2", "h3", "h4")), ledgers),
                          sum(rnd["keys"].values()))


def test_sealed_shares_open_only_for_their_recipient_and_context(fed):
    share = fed.dealt["h1"]["h2"]
    sealed = fed.sealed[("h1", "h2")]
    opened = ceremony.DealtShare.from_bytes(ceremony.unseal(fed.ids["h2"].agreement_key, sealed, share.aad()))
    assert np.array_equal(opened.value, share.value)
    with pytest.raises(CeremonyError, match="does not open"):
        ceremony.unseal(fed.ids["h3"].agreement_key, sealed, share.aad())
    with pytest.raises(CeremonyError, match="does not open"):  # re-addressed to another recipient
        ceremony.unseal(fed.ids["h2"].agreement_key, sealed, ceremony.share_aad("ceremony-1", "h1", "h3"))
    assert share.to_bytes()[-64:] not in sealed
    assert "value" not in repr(share) and "sigma" not in repr(fed.shares["h1"])


def test_ceremony_refuses_incomplete_or_foreign_inputs(fed):
    params = fed.params
    contribution, shares = ceremony.generate_share(params, "h1")
    with pytest.raises(CeremonyError, match="missing public contributions"):
        ceremony.finalize(params, [contribution])
    with pytest.raises(CeremonyError, match="two public contributions"):
        ceremony.finalize(params, [contribution, contribution])
    with pytest.raises(CeremonyError, match="addressed to"):
        ceremony.aggregate_shares(params, "h1", [shares["h2"]], fed.public_key)
    other = CeremonyParams("fed", PARTIES, T, "ceremony-2")
    with pytest.raises(CeremonyError, match="ceremony"):
        ceremony.aggregate_shares(other, "h1", [shares["h1"]], fed.public_key)
    with pytest.raises(CeremonyError, match="not a party"):
        ceremony.generate_share(params, "mallory")
    with pytest.raises(CeremonyError, match="threshold"):
        CeremonyParams("fed", PARTIES, 6, "x")
    with pytest.raises(CeremonyError, match="not a majority"):
        CeremonyParams("fed", PARTIES, 2, "x")
    assert CeremonyParams("fed", PARTIES, 2, "x", allow_minority=True).threshold == 2
    saved = ceremony.CommitteeShare.from_bytes(fed.shares["h3"].to_bytes())
    assert np.array_equal(saved.sigma, fed.shares["h3"].sigma) and saved.params == params


def test_partials_travel_sealed_to_each_hospital(fed, ledgers):
    """A bucket reader holding every sealed partial cannot combine them; each hospital can."""
    rnd = fed.round(6)
    request = fed.request(rnd, 6)
    verify = committee.signed_upload_verifier(fed.registry)
    recipients = {p: fed.registry.get(p).x25519 for p in PARTIES}
    sealed = {}
    for member in request.active:
        partial = committee.partial_decrypt(fed.shares[member], request, min_clients=3, verify=verify,
                                            ledger=ledgers[member])
        sealed[member] = committee.seal_partial(partial, recipients)
    for me in ("h4", "h5"):  # not in the active set, still get the model
        opened = [committee.open_partial(sealed[m][me], me, fed.ids[me].agreement_key, party=m, request=request)
                  for m in request.active]
        assert np.array_equal(committee.combine(request, opened), sum(rnd["keys"].values()))
    with pytest.raises(CeremonyError, match="does not open"):  # h5's copy is not h4's
        committee.open_partial(sealed["h1"]["h5"], "h4", fed.ids["h4"].agreement_key, party="h1", request=request)
    with pytest.raises(CeremonyError, match="does not open"):  # nor re-attributed to another member
        committee.open_partial(sealed["h1"]["h4"], "h4", fed.ids["h4"].agreement_key, party="h2", request=request)
    blobs = b"".join(b for per in sealed.values() for b in per.values())
    assert len(blobs) > 3 * 5 * 49_000 and fed.shares["h1"].sigma.astype("<u4").tobytes()[:64] not in blobs

"""Identities, the registry and signed messages: each check refuses the forgery it exists for."""
from __future__ import annotations

import json
import stat

import pytest

from cxr_mq import identity, messages
from cxr_mq.identity import Identity, IdentityError, PublicIdentity, Registry, Verifier
from cxr_mq.storage.local import LocalStore

SHA = "a" * 64
NOW = 1_800_000_000.0


def update(**overrides) -> dict:
    fields = dict(round=2, hospital="h1", key="rounds/000002/updates/h1", sha256=SHA, size=10,
                  n_samples=5, n_params=100, key_fingerprint=SHA, metrics={"train": {"loss": 0.5}},
                  sent_at=NOW)
    fields.update(overrides)
    return messages.make("update_ready", **fields)


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def parties(store):
    return {name: identity.provision(store, name, role) for name, role in
            [("h1", "hospital"), ("h2", "hospital"), ("agg", "aggregator"), ("ctl", "controller")]}


@pytest.fixture
def verifier(store):
    return Verifier(Registry(store), clock=lambda: NOW + 1)


def test_signed_message_verifies_and_survives_the_wire(parties, verifier):
    signed = identity.sign(update(), parties["h1"])
    decoded = messages.decode(messages.encode(signed))  # schema allows signer and signature
    assert decoded == signed
    sender = verifier.verify(decoded, broker_user="h1")
    assert (sender.id, sender.role) == ("h1", "hospital")


def test_signature_survives_the_json_round_record(parties, store):
    start = messages.make("round_start", round=1, base_model_key="rounds/000001/base",
                          base_model_sha256=SHA, base_model_encrypted=False, base_total_samples=0,
                          quorum=3, min_clients=3, deadline=NOW + 60.0,
                          training={"model": "small-cnn", "epochs": 1, "lr": 0.001},
                          key_fingerprint=SHA, codec_profile="compact", n_params=10,
                          hospitals=["h1", "h2"], issued_at=NOW)
    signed = identity.sign(start, parties["ctl"])
    reread = json.loads(json.dumps(signed))
    assert identity.verify(reread, Registry(store), clock=lambda: NOW).id == "ctl"


@pytest.mark.parametrize("change, reason", [
    (dict(round=3), r"^bad signature on update_ready from 'h1'$"),           # re-addressed
    (dict(key="rounds/000002/updates/h2"), r"^bad signature"),                 # redirected
    (dict(sha256="b" * 64), r"^bad signature"),
    (dict(n_samples=500), r"^bad signature"),
    (dict(sent_at=NOW + 0.5), r"^bad signature"),
    (dict(metrics={"train": {"loss": 0.1}}), r"^bad signature"),
    (dict(signer="h2"), r"^bad signature on update_ready from 'h2'$"),       # claims another signer
])
def test_any_change_breaks_the_signature(parties, verifier, change, reason):
    forged = {**identity.sign(update(), parties["h1"]), **change}
    with pytest.raises(IdentityError, match=reason):
        verifier.verify(forged, broker_user=forged["signer"])


def test_unsigned_unknown_wrong_role_and_impersonation_are_refused(parties, verifier, store):
    with pytest.raises(IdentityError, match=r"^unsigned update_ready: no signer or signature$"):
        verifier.verify(update(), broker_user="h1")
    mallory = Identity.generate("mallory")  # has keys, but nobody registered them
    with pytest.raises(IdentityError, match=r"^unknown sender 'mallory': no identity in the registry$"):
        verifier.verify(identity.sign(update(hospital="mallory"), mallory), broker_user="mallory")
    with pytest.raises(IdentityError, match=r"^wrong role: update_ready from 'agg', registered as "
                                            r"aggregator; only the hospital role may send it$"):
        verifier.verify(identity.sign(update(hospital="agg"), parties["agg"]), broker_user="agg")
    # h2 signs an update naming h1 (and h1's object): its own signature, someone else's name
    with pytest.raises(IdentityError, match=r"^update_ready signed by 'h2' names hospital 'h1'$"):
        verifier.verify(identity.sign(update(), parties["h2"]), broker_user="h2")
    # h1's keys re-registered with someone else's: the old signature no longer verifies
    identity.register(store, Identity.generate("h1").public, "hospital", force=True)
    fresh = Verifier(Registry(store), clock=lambda: NOW)
    with pytest.raises(IdentityError, match=r"^bad signature"):
        fresh.verify(identity.sign(update(), parties["h1"]), broker_user="h1")


def test_broker_user_must_be_the_signer_unless_shared(parties, store):
    signed = identity.sign(update(), parties["h1"])
    strict = Verifier(Registry(store), clock=lambda: NOW)
    with pytest.raises(IdentityError, match=r"^broker user 'h2' published a update_ready signed by 'h1'$"):
        strict.verify(signed, broker_user="h2")
    with pytest.raises(IdentityError, match=r"carries no broker user_id$"):
        strict.verify(signed, broker_user=None)
    shared = Verifier(Registry(store), clock=lambda: NOW, shared_broker_users=frozenset({"guest"}))
    assert shared.verify(signed, broker_user="guest").id == "h1"
    with pytest.raises(IdentityError, match=r"^broker user 'h2'"):
        shared.verify(signed, broker_user="h2")


def test_stale_and_future_messages_are_refused(parties, store):
    signed = identity.sign(update(), parties["h1"])
    late = Verifier(Registry(store), max_age=3600, clock=lambda: NOW + 3601)
    with pytest.raises(IdentityError, match=r"^stale update_ready from 'h1': signed 3601s ago"):
        late.verify(signed, broker_user="h1")
    early = Verifier(Registry(store), max_skew=300, clock=lambda: NOW - 301)
    with pytest.raises(IdentityError, match=r"dated 301s in the future$"):
        early.verify(signed, broker_user="h1")
    assert Verifier(Registry(store), max_age=3600, clock=lambda: NOW + 3599).verify(
        signed, broker_user="h1").id == "h1"


def test_roles_per_kind(parties, verifier):
    outcome = messages.make("round_aborted", round=1, reason="deadline", contributors=[],
                            finished_at=NOW)
    assert verifier.verify(identity.sign(outcome, parties["agg"]), broker_user="agg").id == "agg"
    with pytest.raises(IdentityError, match=r"^wrong role: round_aborted from 'ctl'"):
        verifier.verify(identity.sign(outcome, parties["ctl"]), broker_user="ctl")
    # a kind outside the table: the caller names the role
    custom = {"schema": "key_share", "version": 1, "at": NOW}
    with pytest.raises(IdentityError, match="no sender role"):
        verifier.verify(identity.sign(custom, parties["ctl"]), broker_user="ctl")
    assert verifier.verify(identity.sign(custom, parties["ctl"]), broker_user="ctl",
                           role="controller", time_field="at").id == "ctl"


def test_key_files_modes_round_trip_and_repr(tmp_path):
    ident = Identity.generate("north")
    key_path, pub_path = ident.save(tmp_path / "ids")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    loaded = Identity.load(key_path)
    assert loaded.public == ident.public == PublicIdentity.load(pub_path)
    assert "private" not in pub_path.read_text()
    assert ident.public.to_dict()["ed25519"] not in repr(ident) and "signing_key" not in repr(ident)
    with pytest.raises(IdentityError, match="exist already"):
        ident.save(tmp_path / "ids")
    key_path.chmod(0o644)
    Identity.generate("north").save(tmp_path / "ids", force=True)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600  # replaced, not rewritten in place
    (tmp_path / "bad.key").write_text("{}")
    with pytest.raises(IdentityError, match="not an identity key file"):
        Identity.load(tmp_path / "bad.key")
    # X25519: two parties agree on the same secret (the threshold ceremony's key shares)
    other = Identity.generate("south")
    assert (ident.agreement_key.exchange(other.public.x25519_key)
            == other.agreement_key.exchange(ident.public.x25519_key))


def test_registry_refuses_silent_replacement_and_lists_parties(store, parties):
    with pytest.raises(IdentityError, match="registered already"):
        identity.register(store, Identity.generate("h1").public, "hospital")
    identity.register(store, parties["h1"].public, "hospital")  # the same keys again: fine
    registry = Registry(store)
    assert [p.id for p in registry.parties("hospital")] == ["h1", "h2"]
    assert registry.require(parties["agg"], "aggregator").role == "aggregator"
    with pytest.raises(IdentityError, match="registered as hospital, not aggregator"):
        registry.require(parties["h1"], "aggregator")
    with pytest.raises(IdentityError, match="does not match the registry"):
        registry.require(Identity.generate("h2"), "hospital")


def test_registry_caches_misses_so_made_up_senders_cost_little(store, parties):
    clock = [0.0]
    reads = []

    class Counting(LocalStore):
        def get_bytes(self, key, sha256=None):
            reads.append(key)
            return super().get_bytes(key, sha256)
    registry = Registry(Counting(store.root), miss_ttl=10, clock=lambda: clock[0])
    for _ in range(50):
        with pytest.raises(IdentityError):
            registry.get("nobody")
    assert len(reads) == 1
    identity.provision(store, "nobody", "hospital")
    clock[0] = 11
    assert registry.get("nobody").id == "nobody"


def test_cli_identity_init_writes_both_files(tmp_path):
    from click.testing import CliRunner

    from cxr_mq.cli import main
    runner = CliRunner()
    result = runner.invoke(main, ["identity", "init", "--id", "north", "--out", str(tmp_path)],
                           env={"CXR_MQ_CONFIG": ""})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    public = PublicIdentity.load(tmp_path / "north.pub")
    assert shown["ed25519"] == public.ed25519.hex() and shown["x25519"] == public.x25519.hex()
    assert Identity.load(tmp_path / "north.key").public == public
    again = runner.invoke(main, ["identity", "init", "--id", "north", "--out", str(tmp_path)],
                          env={"CXR_MQ_CONFIG": ""})
    assert again.exit_code == 2 and "exist already" in again.output
    bad = runner.invoke(main, ["identity", "init", "--id", "../x", "--out", str(tmp_path)],
                        env={"CXR_MQ_CONFIG": ""})
    assert bad.exit_code == 2 and "invalid party id" in bad.output


def test_bench_reports_the_cost_of_signing_and_verifying_per_round():
    from cxr_mq.bench import signing_costs

    costs = signing_costs([2, 10], 1000, {"compact": {"aggregate_mparams_per_s": 50.0}}, repeats=5)
    assert costs["sign_us"] > 0 and costs["verify_us"] > 0
    per_round = costs["per_round_ms"]
    assert per_round["10"] == pytest.approx((12 * costs["sign_us"] + 42 * costs["verify_us"]) / 1e3)
    assert per_round["2"] < per_round["10"]
    assert costs["verify_vs_adding_one_update"] == pytest.approx(costs["verify_us"] / 20.0)

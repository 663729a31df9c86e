"""The hospital worker in one process: embedded broker, local store, fake clock, real CKKS and
real (tiny) TensorFlow training.

The round-2 check is exact: the weights the hospital starts training from must be the
decrypted aggregate of round 1, bit for bit (as float32), or federated learning silently
stops accumulating.
"""
from __future__ import annotations

import io

import numpy as np
import pytest

from cxr_mq import controller, messages, rounds, synth, training
from cxr_mq.rounds import COMPLETE, RoundState
from cxr_mq.transport.base import TransportError

PARAMS = training.TrainingParams(image_size=8, epochs=1, batch_size=8, augment=False, width=0.5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hospital-data")
    synth.write_synthetic(out, n=24, seed=3, size=16)
    return out


@pytest.fixture
def training_starts(monkeypatch):
    """The flat weights of every model the hospital starts training (real training follows)."""
    starts = []
    real = training.train_local

    def spy(model, data, params, **kwargs):
        starts.append(training.flat_weights(model).copy())
        return real(model, data, params, **kwargs)
    monkeypatch.setattr(training, "train_local", spy)
    return starts


def _updates_published(fed) -> list[dict]:
    queue = fed.server.queue(fed.topology.aggregator_queue)
    return [m for m in (messages.decode(x.body) for x in queue.messages) if m["schema"] == "update_ready"]


def _complete_round_one(fed, weights: np.ndarray, total_samples: int) -> None:
    """Round 1 finished as the aggregator leaves it: an encrypted aggregate and its record."""
    request = controller.RoundRequest(quorum=1, min_clients=1, deadline_seconds=60, training=PARAMS,
                                      min_clients_floor=1)
    start = controller.open_round(fed.control, fed.store, fed.public, request,
                                  fed.identities["controller"], clock=fed.clock)
    for h in fed.hospitals:  # round 1's round_start is not what these tests are about
        fed.server.queue(fed.topology.hospital_queue(h)).messages.clear()
    buf = io.BytesIO()
    fed.secret.encrypt_update(weights, total_samples, buf)  # a one-update sum has the same format
    info = fed.store.put_bytes(rounds.aggregate_key(1), buf.getvalue())
    state = RoundState.from_round_start(start, fed.now)
    state.status, state.model_key, state.model_sha256 = COMPLETE, info.key, info.sha256
    state.total_samples, state.announced = total_samples, True
    state.save(fed.store)


def test_round_two_trains_from_exactly_round_ones_decrypted_model(fed, data_dir, training_starts):
    initial = training.flat_weights(training.build_model(PARAMS))
    round_one = initial + np.random.default_rng(5).normal(0, 0.05, initial.size).astype(np.float32)
    _complete_round_one(fed, round_one, total_samples=40)
    request = controller.RoundRequest(quorum=1, min_clients=1, deadline_seconds=60, training=PARAMS,
                                      min_clients_floor=1)
    start = controller.open_round(fed.control, fed.store, fed.public, request,
                                  fed.identities["controller"], clock=fed.clock)
    assert start["round"] == 2 and start["base_model_encrypted"] is True
    hospital = fed.hospital("h1", data_dir)
    fed.drain(hospital)
    assert len(training_starts) == 1, f"the hospital trained {len(training_starts)} times in round 2"
    raw = fed.store.get_bytes(rounds.aggregate_key(1))
    expected = np.asarray(fed.secret.decrypt_aggregate(io.BytesIO(raw), 40), dtype=np.float32)
    started = training_starts[0]
    assert started.shape == expected.shape
    assert np.array_equal(started, expected), (
        f"round 2's hospital started training from weights that are not round 1's decrypted "
        f"model (max difference {np.max(np.abs(started - expected)):.3g}; from the fresh "
        f"initialisation: {np.max(np.abs(started - initial)):.3g}): the base model was not loaded")
    published = _updates_published(fed)
    assert [(u["round"], u["hospital"]) for u in published] == [(2, "h1")]


def test_a_round_start_under_another_key_is_dead_lettered(fed, data_dir, training_starts):
    hospital = fed.hospital("h1", data_dir)
    message = fed.open_round(quorum=1)
    message = {**message, "key_fingerprint": "f" * 64}
    fed.server.queue(fed.topology.hospital_queue("h1")).messages.clear()
    fed.publish(messages.validate(message))
    fed.drain(hospital)
    dead = [d for d in fed.dead_letters() if d["queue"] == fed.topology.hospital_queue("h1")]
    assert len(dead) == 1 and "cannot take part: context ffffffffffffffff… is not held here" in dead[0]["reason"], dead
    assert training_starts == [] and _updates_published(fed) == []


def test_a_round_naming_a_context_the_hospital_cannot_use_is_refused_with_the_reason(fed, data_dir, training_starts):
    """A new context in the store, named by a round, is taken only if this hospital can use
    it: a threshold one needs its committee share, a single-key one its secret file."""
    from cxr_mq import crypto
    from cxr_mq.crypto.ceremony import CeremonyParams, run_local
    from cxr_mq.crypto.threshold import ThresholdCodec

    hospital = fed.hospital("h1", data_dir)
    params = CeremonyParams("fed", ("h1", "h2", "h3"), 2, "c-9")
    committee = ThresholdCodec(run_local(params)[0], federation="fed", parties=params.parties, threshold=2,
                               ceremony_id="c-9")
    single = crypto.load_context(crypto.generate_keys("compact").public)
    for round_no, codec in ((1, committee), (2, single)):
        fed.store.put_bytes("keys/public-context", codec.public_bytes())
        fed.open_round(round_no=round_no, quorum=1, key_fingerprint=codec.fingerprint)
        fed.drain(hospital)
    reasons = [d["reason"] for d in fed.dead_letters() if d["queue"] == fed.topology.hospital_queue("h1")]
    assert reasons == [
        f"round 1: hospital h1 cannot take part: context {committee.fingerprint[:16]}… (threshold): hospital h1 "
        "holds no committee share of ceremony 'c-9' (was it a party, and running during the ceremony?)",
        f"round 2: hospital h1 cannot take part: context {single.fingerprint[:16]}… (compact): a compact context "
        "needs its secret context file: restart hospital h1 with it (--secret-context)"], reasons
    assert hospital.codec.fingerprint == fed.secret.fingerprint and training_starts == []
    assert "holds no committee share" in rounds.hospital_refusals(fed.store, 1)[0]["reason"]


def test_a_round_for_other_hospitals_or_already_finished_is_acked_without_training(fed, data_dir, training_starts):
    hospital = fed.hospital("h1", data_dir)
    fed.open_round(round_no=1, quorum=1, hospitals=["h2"])  # not for h1
    start = fed.open_round(round_no=2, quorum=1)
    state = RoundState.from_round_start(start, fed.now)
    state.status = COMPLETE
    state.save(fed.store)  # finished before h1 got to it
    fed.drain(hospital)
    assert training_starts == [], "the hospital trained for a round it is not part of, or one already over"
    assert _updates_published(fed) == [] and fed.dead_letters() == []


def test_a_restarted_hospital_republishes_its_update_without_training_again(fed, data_dir, training_starts):
    start = fed.open_round(quorum=1, n_params=100)
    before = fed.upload_update(1, "h1", np.zeros(100), 17)
    fed.store.put_bytes(rounds.update_message_key(1, "h1"), messages.encode(before))
    hospital = fed.hospital("h1", data_dir)  # the process that uploaded died before the ack
    fed.drain(hospital)
    assert training_starts == [], "a hospital restarted after uploading trained a second update"
    assert _updates_published(fed) == [before], "the update already uploaded was not republished as it was"
    assert start["round"] == 1


def test_forged_redirected_or_stale_outcomes_are_refused_before_decrypting(fed, data_dir, training_starts):
    """A hospital decrypts and applies only an aggregate that the registered aggregator
    announced, at the round's own aggregate key, for a round whose record the controller
    signed, and never an older round's over a newer one."""
    hospital = fed.hospital("h1", data_dir)
    start = fed.open_round(quorum=1, n_params=100)
    fed.server.queue(fed.topology.hospital_queue("h1")).messages.clear()
    ready = messages.make("model_ready", round=1, key=rounds.aggregate_key(1), sha256="0" * 64,
                          contributors=["h2"], total_samples=5, n_params=100,
                          key_fingerprint=fed.secret.fingerprint, metrics={}, finished_at=fed.now)
    forged_record = {**start, "training": {**start["training"], "epochs": 99}}
    rounds.write_json(fed.store, rounds.round_key(2), {**forged_record, "round": 2})
    cases = [  # (message, login, body override, reason)
        (ready, "aggregator", messages.encode(ready), "unsigned model_ready: no signer or signature"),
        (ready, "aggregator", messages.encode(fed.sign(ready, "h2")),
         "wrong role: model_ready from 'h2', registered as hospital; only the aggregator role may send it"),
        ({**ready, "key": rounds.update_key(1, "h2")}, "aggregator", None,
         "model_ready for round 1 names 'rounds/000001/updates/h2', not the round's aggregate "
         "'rounds/000001/aggregate'"),
        ({**ready, "round": 2, "key": rounds.aggregate_key(2)}, "aggregator", None,
         "round 2's record: bad signature on round_start from 'controller'"),
    ]
    with pytest.raises(TransportError, match="403 ACCESS_REFUSED"):  # h2's own login cannot
        fed.publish(ready, body=messages.encode(fed.sign(ready, "h2")), login="h2")
    for message, login, body, _ in cases:
        fed.publish(message, body=body, login=login)
    fed.drain(hospital)
    dead = [d["reason"] for d in fed.dead_letters() if d["queue"] == fed.topology.hospital_queue("h1")]
    assert dead == [reason for *_, reason in cases]
    assert training_starts == [] and hospital._applied_model is None
    # and `cxr-mq status` shows each, with its reason, under the round it claimed; an
    # undecodable one under "malformed"
    fed.publish(ready, body=b"\xc1 not msgpack", login="aggregator")
    fed.drain(hospital)
    rows = {row["round"]: row for row in controller.status(fed.store, now=fed.now)}
    shown = [(r["hospital"], r["message"], r["reason"]) for n in (1, 2) for r in rows[n]["refused_by_hospitals"]]
    assert shown == [("h1", "model_ready", reason) for *_, reason in cases]
    assert rows[1]["refused_by_hospitals"][0]["broker_user"] == "aggregator"
    (garbage,) = rows[0]["refused_by_hospitals"]
    assert rows[0]["state"] == "malformed" and garbage["message"] == "undecodable message"
    assert garbage["reason"].startswith("not msgpack")


def test_a_round_it_cannot_train_for_is_dead_lettered_once_with_the_reason(fed, tmp_path, training_starts):
    """Unusable local data is permanent for the round: dead-letter round_start with the file and
    the problem (and record it for `status`) instead of requeueing it for ever."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    hospital = fed.hospital("h1", empty)
    request = controller.RoundRequest(quorum=1, min_clients=1, deadline_seconds=60, training=PARAMS,
                                      min_clients_floor=1)
    controller.open_round(fed.control, fed.store, fed.public, request, fed.identities["controller"],
                          clock=fed.clock)
    fed.drain(hospital)
    dead = [d for d in fed.dead_letters() if d["queue"] == fed.topology.hospital_queue("h1")]
    assert len(dead) == 1, dead
    assert "cannot train on its data" in dead[0]["reason"] and "no label file" in dead[0]["reason"], dead
    assert str(empty) in dead[0]["reason"], dead
    recorded = rounds.hospital_refusals(fed.store, 1)
    assert [(r["hospital"], r["message"]) for r in recorded] == [("h1", "round_start")], recorded
    assert "no label file" in recorded[0]["reason"], recorded
    assert training_starts == [] and _updates_published(fed) == []
    left = list(fed.server.queue(fed.topology.hospital_queue("h1")).messages)
    assert left == [], ("round_start was requeued", [(m.routing_key, m.headers) for m in left])


def test_the_hospital_trains_with_the_local_options_round_start_carries(fed, data_dir, monkeypatch):
    """local_optimizer, local_momentum, epoch_fraction and logit_adjust travel in round_start
    and are what the hospital trains with: SGD with that momentum, that many steps, the local
    prior in the loss."""
    seen = []
    real = training.train_local

    def spy(model, data, params, **kwargs):
        out = real(model, data, params, **kwargs)
        seen.append((params, type(model.optimizer).__name__, float(getattr(model.optimizer, "momentum", -1)),
                     int(model.optimizer.iterations.numpy()), training.local_steps_per_epoch(params, data.n_train),
                     model._cxr_mq_terms.log_prior.numpy().copy(), training.local_log_prior(data)))
        return out
    monkeypatch.setattr(training, "train_local", spy)
    params = training.TrainingParams(**{**PARAMS.to_dict(), "local_optimizer": "sgd", "local_momentum": 0.5,
                                        "epoch_fraction": 0.5, "logit_adjust": 2.0, "epochs": 2})
    request = controller.RoundRequest(quorum=1, min_clients=1, deadline_seconds=60, training=params,
                                      min_clients_floor=1)
    controller.open_round(fed.control, fed.store, fed.public, request, fed.identities["controller"],
                          clock=fed.clock)
    fed.drain(fed.hospital("h1", data_dir))
    assert len(seen) == 1
    got, optimizer, momentum, steps, per_epoch, log_prior, local_prior = seen[0]
    assert got == params and optimizer == "SGD" and momentum == 0.5
    assert steps == 2 * per_epoch == 2 * int(np.ceil(0.5 * np.ceil(_n_train(data_dir) / 8)))
    assert np.allclose(log_prior, 2.0 * local_prior) and np.any(log_prior)
    assert [(u["round"], u["hospital"]) for u in _updates_published(fed)] == [(1, "h1")]


def _n_train(data_dir) -> int:
    """Training images the hospital holds (its local split, as LocalData makes it)."""
    return training.LocalData.from_dir(data_dir, PARAMS).n_train


def test_fedsgd_draws_come_from_a_secret_kept_across_restarts(fed, data_dir, monkeypatch):
    """FedSGD: a hospital's minibatch draws are CSPRNG-seeded, and its epoch permutations
    (shuffle_rounds) come from 128 random bits it keeps in its work dir (mode 0600): the same
    after a restart mid-epoch, another hospital's different, nothing in round_start to predict
    them from."""
    seen = []
    real = training.train_local

    def spy(model, data, params, **kwargs):
        seen.append((kwargs["rng"], kwargs["epoch_rng"]))
        return real(model, data, params, **kwargs)
    monkeypatch.setattr(training, "train_local", spy)
    params = training.TrainingParams(**{**PARAMS.to_dict(), "strategy": "fedsgd", "lr": 1.0,
                                        "balance": "none", "shuffle_rounds": 2})
    request = controller.RoundRequest(quorum=1, min_clients=1, deadline_seconds=60, training=params,
                                      min_clients_floor=1)
    controller.open_round(fed.control, fed.store, fed.public, request, fed.identities["controller"],
                          clock=fed.clock)
    fed.drain(fed.hospital("h1", data_dir))
    secret = fed.root / "work" / "h1" / "sampling-secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_text().strip()) == 32
    (rng, epoch_rng), = seen
    restarted = fed.hospital("h1", data_dir)._sampling_secret()
    other = fed.hospital("h2", data_dir)._sampling_secret()
    assert restarted == int(secret.read_text(), 16) != other
    assert np.array_equal(epoch_rng(5).permutation(50), np.random.default_rng([restarted, 5]).permutation(50))
    assert not np.array_equal(epoch_rng(5).permutation(50), np.random.default_rng([other, 5]).permutation(50))
    assert rng.bit_generator.seed_seq.entropy.bit_length() > 64  # not params.seed and the round

import json
from importlib import resources

import msgpack
import pytest

from cxr_mq import messages
from cxr_mq.messages import MessageError

SHA = "a" * 64


def update(**overrides):
    fields = dict(round=1, hospital="h1", key="rounds/000001/updates/h1", sha256=SHA, size=10,
                  n_samples=5, n_params=100, key_fingerprint=SHA, metrics={"train": {"loss": 0.5}},
                  sent_at=1.0)
    fields.update(overrides)
    return fields


def test_round_trip_every_kind():
    samples = {
        "round_start": dict(round=1, base_model_key="rounds/000001/base", base_model_sha256=SHA,
                            base_model_encrypted=False, base_total_samples=0, quorum=3,
                            min_clients=2, deadline=10.0, training={"model": "small-cnn", "epochs": 1},
                            key_fingerprint=SHA, codec_profile="compact", n_params=10,
                            hospitals=["h1"], issued_at=1.0),
        "update_ready": update(),
        "model_ready": dict(round=1, key="k", sha256=SHA, contributors=["h1"], total_samples=5,
                            n_params=10, key_fingerprint=SHA, metrics={}, finished_at=2.0),
        "round_aborted": dict(round=1, reason="deadline", contributors=[], finished_at=2.0),
        "ceremony_start": dict(ceremony_id="c-1", issued_at=1.0),
        "ceremony_finalize": dict(ceremony_id="c-1", public_sha256=SHA, issued_at=2.0),
    }
    assert set(samples) == set(messages.KINDS)
    for kind, fields in samples.items():
        message = messages.make(kind, **fields)
        assert messages.decode(messages.encode(message)) == message


def test_each_kind_has_a_schema_file_with_its_name():
    for kind in messages.KINDS:
        schema = json.loads(resources.files("cxr_mq.schemas").joinpath(f"{kind}.v1.json").read_text())
        assert schema["properties"]["schema"]["const"] == kind


@pytest.mark.parametrize("body, reason", [
    (b"\xc1\x00garbage", "not msgpack"),
    (msgpack.packb([1, 2, 3]), "not a msgpack map"),
    (msgpack.packb({"schema": "update_ready", "version": 9}), "unknown schema"),
    (msgpack.packb({"schema": "nonsense", "version": 1}), "unknown schema"),
    (msgpack.packb({"schema": "update_ready", "version": 1, **{k: v for k, v in update().items() if k != "sha256"}}),
     "'sha256' is a required property"),
    (msgpack.packb({"schema": "update_ready", "version": 1, **update(sha256="xyz")}), "sha256"),
    (msgpack.packb({"schema": "update_ready", "version": 1, **update(n_samples=0)}), "n_samples"),
    (msgpack.packb({"schema": "update_ready", "version": 1, **update(extra=1)}), "Additional properties"),
    (msgpack.packb({"schema": "update_ready", "version": 1, **update(hospital="../x")}), "hospital"),
])
def test_decode_failures_give_reasons(body, reason):
    with pytest.raises(MessageError) as info:
        messages.decode(body)
    assert reason in str(info.value)


def test_oversized_message_refused_before_decoding():
    with pytest.raises(MessageError, match="oversized"):
        messages.decode(b"\x00" * (messages.MAX_MESSAGE_BYTES + 1))


def test_encode_validates_before_sending():
    with pytest.raises(MessageError):
        messages.encode({"schema": "update_ready", "version": 1, "round": 0})

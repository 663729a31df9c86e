"""Committee changes with running workers, over the real RabbitMQ and moto's S3/KMS: workers
started before the key ceremony take the threshold context without a restart and complete a
round; ``cxr-mq keys reshare`` (a new ceremony) adds h4 and removes h3 while everything runs,
and the next round completes with h4; the old shares, even all of them, do not decrypt the
new round's key sum; ``evaluate`` / ``predict`` use the model a hospital holds and refuse
another round's."""
from __future__ import annotations

import io
import itertools
import json
import uuid

import pytest

from cxr_mq import crypto, threshold_flow
from cxr_mq.crypto import keylayer
from cxr_mq.crypto.ceremony import CommitteeShare

from . import iam
from .cluster import Cluster
from .test_threshold_ceremony import decrypt_with_shares
from .test_threshold_rounds import _decrypted

pytestmark = pytest.mark.slow
# FedAvgM: the server step needs state each hospital keeps, which a newcomer takes over too
ROUND_ARGS = ("--max-samples", "200", "--deadline", "120", "--image-size", "32", "--strategy", "fedavgm")


def test_committee_change_with_running_workers(tmp_path, amqp_url, s3_settings):
    # compact first: workers running on a single-key context take the ceremony's without a
    # restart (a first rollout with no key at all is test_round.py's and test_threshold_rounds.py's)
    cluster = Cluster(tmp_path, amqp_url, s3_settings, f"t{uuid.uuid4().hex[:10]}", ("h1", "h2", "h3", "h4"),
                      synthetic=True, profile="compact", audit=True)
    cluster.env["CXR_MQ_HOSPITALS"] = "h1,h2,h3"
    cluster.env["CXR_MQ_COMMITTEE_TIMEOUT"] = "60"
    store, work = cluster.store(), tmp_path / "work"
    try:
        cluster.init_keys()  # a compact context: what the workers start with
        cluster.start_aggregator()
        for h in ("h1", "h2", "h3"):
            cluster.start_hospital(h)
        for name in ("aggregator", "h1", "h2", "h3"):
            cluster.wait_for_event(name, "worker_started")
        first = json.loads(cluster.cli("keys", "init", "--threshold", "2", "--timeout", "120").stdout)

        # no restart: the aggregator loads the context round 1 names, the hospitals took it at finalize
        code, result = cluster.start_round(*ROUND_ARGS)
        assert code == 0 and result["status"] == "complete", result
        assert result["committee"]["decrypted"] and result["contributors"] == ["h1", "h2", "h3"]
        assert cluster.find_events("aggregator", "public_context_loaded", round=1)
        for h in ("h1", "h2", "h3"):  # at ceremony_finalize, before any round named it
            assert cluster.find_events(h, "public_context_taken", ceremony=first["ceremony_id"])
        assert all(h in cluster.procs for h in ("aggregator", "h1", "h2", "h3"))

        cluster.make_data(n=12, size=32)
        # start-round --wait returns once the first member decrypted; h1 may still be finishing
        cluster.wait_for_event("h1", "global_model_applied", round=1)
        report = json.loads(cluster.cli("evaluate", "--hospital", "h1", "--data", str(cluster.data_dirs["h1"]),
                                        "--json").stdout)
        assert report["round"] == 1 and report["hospital"] == "h1" and 0 <= report["accuracy"] <= 1
        refused = cluster.cli("evaluate", "--data", str(cluster.data_dirs["h1"]), "--secret-context",
                              str(cluster.keys_dir / "secret.ctx"), check=False)
        assert refused.returncode == 2 and "threshold round: no key decrypts its aggregate" in refused.stderr

        old_shares = {h: CommitteeShare.from_bytes(threshold_flow.share_path(work / h, first["ceremony_id"]).read_bytes())
                      for h in ("h1", "h2", "h3")}

        # h4 joins, h3 leaves: a new ceremony with everything running
        cluster.start_hospital("h4")
        cluster.wait_for_event("h4", "worker_started")
        cluster.env["CXR_MQ_HOSPITALS"] = "h1,h2,h4"
        reshare = cluster.cli("keys", "reshare", "--timeout", "120")
        second = json.loads(reshare.stdout)
        assert "adding h4, removing h3" in reshare.stderr
        assert second["parties"] == ["h1", "h2", "h4"] and second["threshold"] == 2
        assert second["added"] == ["h4"] and second["removed"] == ["h3"]
        assert second["previous_ceremony_id"] == first["ceremony_id"]
        for h in ("h1", "h2"):  # the members deleted their old shares; h3, not a party, was not told
            assert not threshold_flow.share_path(work / h, first["ceremony_id"]).exists()
            assert threshold_flow.share_path(work / h, second["ceremony_id"]).exists()
        assert threshold_flow.share_path(work / "h3", first["ceremony_id"]).exists()

        code, result = cluster.start_round(*ROUND_ARGS)
        assert code == 0 and result["status"] == "complete", result
        assert result["contributors"] == ["h1", "h2", "h4"] and result["base_model_key"] == "rounds/000001/aggregate"
        # start-round --wait returns at the first decrypted outcome, and a member may be seconds
        # behind it: with h4's reads of the partials slowed by retried 503s, h4 held no outcome
        # yet when the check below ran
        for h in ("h1", "h2", "h4"):
            cluster.wait_for_event(h, "global_model_applied", round=result["round"])
        assert _decrypted(store, result["round"]) == ["h1", "h2", "h4"]
        cluster.wait_for_event("h3", "model_ready_not_for_this_hospital", round=result["round"])
        held = {h: json.loads((work / h / "global.json").read_text()) for h in ("h1", "h2", "h4")}
        assert {r["round"] for r in held.values()} == {2}
        # h4 took the server step from the momentum it was handed, as the others did
        assert len({r["model_sha256"] for r in held.values()}) == 1, held
        assert not [r for r in cluster.status() if r["round"] == result["round"] and r.get("refused_by_hospitals")]

        # the old committee, every share of it, does not decrypt the new round's key sum; the new one does
        codec = crypto.load_context(cluster.get("keys/public-context"))
        assert codec.ceremony_id == second["ceremony_id"]
        key_sum = codec.key_sum_of(io.BytesIO(cluster.get(result["model_key"])))
        for pair in itertools.combinations(sorted(old_shares), 2):
            with pytest.raises(keylayer.KeyLayerError):
                decrypt_with_shares(key_sum, [old_shares[h] for h in pair], max_abs=3)
        new_shares = [CommitteeShare.from_bytes(threshold_flow.share_path(work / h, second["ceremony_id"]).read_bytes())
                      for h in ("h1", "h4")]
        decrypt_with_shares(key_sum, new_shares, max_abs=3)

        report = json.loads(cluster.cli("evaluate", "--hospital", "h4", "--data", str(cluster.data_dirs["h4"]),
                                        "--json").stdout)
        assert report["round"] == 2 and report["hospital"] == "h4"
        stale = cluster.cli("predict", str(next(cluster.data_dirs["h1"].glob("**/*.png"))), "--hospital", "h1",
                            "--round", "1", check=False)
        assert stale.returncode == 2 and "holds round 2's model, not round 1's" in stale.stderr
        rows = json.loads(cluster.cli("predict", str(next(cluster.data_dirs["h1"].glob("**/*.png"))),
                                      "--hospital", "h2", "--json").stdout)
        assert rows[0]["round"] == 2 and abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5
        # a ceremony over running workers, a reshare with its handover: all within the IAM
        # policies the deployment attaches
        iam.assert_policies_allow(cluster)
    finally:
        cluster.stop_all()

"""TensorFlow first, then every TenSEAL operation the code uses, in one fresh process.

TensorFlow's import puts its own protobuf and zstd into the global symbol scope; TenSEAL
loaded after that used to bind to them and die in ``context.serialize()`` (see
``cxr_mq/native.py``). A crash kills the interpreter, so the scenario runs in a subprocess
that imports nothing of ours until TensorFlow has trained.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

SCENARIO = textwrap.dedent(
    """
    import io
    import numpy as np
    import tensorflow as tf

    # TensorFlow first, and for real: build, train and predict before any TenSEAL code loads.
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    model.fit(np.zeros((8, 4)), np.zeros((8, 2)), verbose=0)
    weights = np.concatenate([w.ravel() for w in model.get_weights()] * 700).astype(np.float64)
    assert "tenseal" not in sys.modules and "_tenseal_cpp" not in sys.modules
    print("trained", flush=True)

    from cxr_mq import crypto

    for profile in ("compact", "seed"):  # the profiles built on TenSEAL (threshold is numpy only)
        pair = crypto.generate_keys(profile)                      # context make + serialize
        secret = crypto.load_context(pair.secret)                 # context load (secret)
        public = crypto.load_context(pair.public)                 # context load (public)
        secret.workers = 1                                        # pool children are fresh
        blobs = []
        for n in (3, 5):
            buf = io.BytesIO()
            secret.encrypt_update(weights, n, buf)                # encrypt (compact: NTT path)
            blobs.append(buf.getvalue())
        total = public.new_sum(weights.size)
        for blob in blobs:
            total.add(io.BytesIO(blob))                           # aggregator: add ciphertexts
        out = io.BytesIO()
        total.write(out)                                          # aggregate serialization
        mean = secret.decrypt_aggregate(io.BytesIO(out.getvalue()), 8)
        assert np.max(np.abs(mean - weights)) < 1e-3, profile
        one = secret.decrypt_update(io.BytesIO(blobs[0]), 3)
        assert np.max(np.abs(one - weights)) < 1e-3, profile
        print("ok", profile, flush=True)

    # A plain ``import tenseal`` after TensorFlow (a notebook, a test) shares the safe load.
    import tenseal as ts
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2**40
    vec = ts.ckks_vector_from(ts.context_from(ctx.serialize(save_secret_key=True)),
                              ts.ckks_vector(ctx, [1.0, 2.0]).serialize())
    assert np.allclose(vec.decrypt(), [1.0, 2.0], atol=1e-4)
    print("ok tenseal", flush=True)
    """
)


def test_tenseal_survives_tensorflow_loaded_first(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", "import sys\n" + SCENARIO], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise AssertionError(
            f"TenSEAL crashed with {name} after TensorFlow ran first (the TensorFlow/TenSEAL "
            f"symbol clash is back: see cxr_mq/native.py); last output: {proc.stdout[-300:]!r}")
    assert proc.returncode == 0, f"scenario failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    done = [line for line in proc.stdout.splitlines() if line.startswith("ok")]
    assert done == ["ok compact", "ok seed", "ok tenseal"], proc.stdout

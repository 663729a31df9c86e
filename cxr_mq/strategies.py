"""Federated strategies under encryption, after Flower's one-class-per-strategy layout.

The aggregator only ever adds ciphertexts: every strategy here is FedAvg's weighted sum on the
wire. What differs lives at the hospitals, in three hooks:

- ``local_objective``: what local training minimises besides the data loss (FedProx's
  proximal term, SCAFFOLD's control-variate correction);
- ``upload``: the plaintext vector a hospital encrypts (and the codec multiplies by its sample
  count). SCAFFOLD's is ``[model ; control delta]``, twice the model, so one encrypted sum
  covers both and the server control variate is as private as the model;
- ``server_step``: what every hospital applies, identically, to the decrypted weighted average
  to get the next global model (FedAvgM / FedAdam / FedYogi's server optimizers, SCAFFOLD's
  control update). Its state (momenta, control variates) lives at the hospitals, on disk.

Every hospital starts a round from the same global model, and reports that model's hash
(``start_sha256`` in ``update_ready``) so a diverged hospital is refused with a reason.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STRATEGIES = ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedsgd")


def model_sha256(weights: np.ndarray) -> str:
    """The hash hospitals report for the model they start from (float32, C order)."""
    return hashlib.sha256(np.ascontiguousarray(weights, dtype=np.float32).tobytes()).hexdigest()


CLIENT_ARRAYS = ("client_control", "next_client_control")  # one hospital's own (SCAFFOLD)


@dataclass
class ServerState:
    """What a hospital keeps between rounds to take the server step itself.

    ``model``: the global model the next round starts from; ``applied``: the sha256 of the
    aggregate that produced it ("" for the initial model); ``m`` / ``v``: server optimizer
    moments; ``control``: SCAFFOLD's server control variate; ``client_control``: this
    hospital's own control variate (SCAFFOLD)."""

    model: np.ndarray
    applied: str = ""
    arrays: dict = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = np.zeros_like(self.model, dtype=np.float64)
        return self.arrays[name]

    def write(self, fh) -> None:
        np.savez(fh, model=self.model, applied=np.array(self.applied),
                 **{f"a_{k}": v for k, v in self.arrays.items()})

    def save(self, path: Path) -> None:
        """Atomically (write then rename): a crash leaves the old state or the new one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            self.write(fh)
        os.replace(tmp, path)

    @classmethod
    def read(cls, src) -> "ServerState":
        with np.load(src, allow_pickle=False) as z:
            return cls(model=z["model"], applied=str(z["applied"]),
                       arrays={k[2:]: z[k] for k in z.files if k.startswith("a_")})

    @classmethod
    def load(cls, path: Path) -> "ServerState | None":
        if not path.exists():
            return None
        return cls.read(path)

    def shared(self) -> "ServerState":
        """The state without this hospital's own arrays: what a hospital joining the
        federation takes over (the server step's moments and control; its own client
        control starts at zero, as SCAFFOLD's does for a new client)."""
        return ServerState(model=self.model, applied=self.applied,
                           arrays={k: v for k, v in self.arrays.items() if k not in CLIENT_ARRAYS})


@dataclass(frozen=True)
class LocalObjective:
    """Extra terms of local training: ``mu/2 ||w - anchor||^2 + <w, correction>`` (the
    gradient of the second is ``correction``, SCAFFOLD's ``c - c_i``); and ``log_prior``
    (per class), added to the log-probabilities inside the data loss (logit adjustment)."""

    anchor: np.ndarray | None = None
    mu: float = 0.0
    correction: np.ndarray | None = None
    log_prior: np.ndarray | None = None

    @property
    def active(self) -> bool:
        return self.mu > 0 or self.correction is not None or self.log_prior is not None


class Strategy:
    """FedAvg: local training as is, upload the trained model, the average is the new model."""

    name = "fedavg"
    upload_factor = 1  # upload length / model size
    stateful = False  # the server step needs more than the average (kept at each hospital)

    def __init__(self, params, sizes=None):
        self.params = params
        # the sizes of the model's tensors in flat order (server_clipnorm clips per tensor)
        self.sizes = None if sizes is None else [int(n) for n in sizes]

    def local_objective(self, base: np.ndarray, state: ServerState) -> LocalObjective:
        return LocalObjective()

    def upload(self, base: np.ndarray, trained: np.ndarray, state: ServerState,
               gradient_at_base=None) -> np.ndarray:
        # server_lr as an extrapolation of each update (see training.extrapolate)
        from .training import extrapolate

        return extrapolate(base, trained, self.params.server_lr)

    def server_step(self, average: np.ndarray, state: ServerState) -> np.ndarray:
        return np.asarray(average, dtype=np.float32)

    @property
    def needs_gradient(self) -> bool:
        return False


class FedProx(Strategy):
    """FedAvg with ``prox_mu/2 ||w - base||^2`` in every hospital's local loss (Li et al. 2020)."""

    name = "fedprox"

    def local_objective(self, base, state):
        return LocalObjective(anchor=base, mu=self.params.prox_mu)


class ServerOptimizer(Strategy):
    """Hospitals upload their trained model; every hospital turns the decrypted average into
    the pseudo-gradient ``delta = average - base`` and takes the same server step."""

    stateful = True

    def upload(self, base, trained, state, gradient_at_base=None):
        return np.asarray(trained, dtype=np.float32)

    def server_step(self, average, state):
        base = state.model.astype(np.float64)
        delta = np.asarray(average, dtype=np.float64) - base
        if self.params.server_clipnorm > 0:
            delta = clip_per_tensor(delta, self.sizes, self.params.server_clipnorm)
        return (base + self.params.server_lr * self.direction(delta, state)).astype(np.float32)

    def direction(self, delta: np.ndarray, state: ServerState) -> np.ndarray:
        raise NotImplementedError


def clip_per_tensor(delta: np.ndarray, sizes, clipnorm: float) -> np.ndarray:
    """``delta`` with each tensor's part (``sizes``, flat order) scaled down to L2 norm at most
    ``clipnorm``: Keras' ``clipnorm``, which central training's Adam applies to each gradient."""
    if not sizes or sum(sizes) != delta.size:
        raise ValueError(f"server_clipnorm needs the model's tensor sizes (got {sizes and sum(sizes)} "
                         f"values for a pseudo-gradient of {delta.size})")
    out, offset = np.array(delta, dtype=np.float64), 0
    for n in sizes:
        part = out[offset:offset + n]
        norm = float(np.linalg.norm(part))
        if norm > clipnorm:
            part *= clipnorm / norm
        offset += n
    return out


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): ``v = beta v + delta; w = w + eta v``."""

    name = "fedavgm"

    def direction(self, delta, state):
        v = self.params.server_momentum * state.get("v") + delta
        state.arrays["v"] = v
        return v


class FedAdam(ServerOptimizer):
    """Adaptive server optimizer (Reddi et al. 2021): ``w = w + eta m / (sqrt(v) + tau)``."""

    name = "fedadam"

    def second_moment(self, v, delta):
        return self.params.beta2 * v + (1 - self.params.beta2) * delta ** 2

    def direction(self, delta, state):
        p = self.params
        m = p.beta1 * state.get("m") + (1 - p.beta1) * delta
        v = self.second_moment(state.get("v"), delta)
        state.arrays["m"], state.arrays["v"] = m, v
        step = m / (np.sqrt(v) + p.tau)
        if p.bias_correction:
            # Adam's (as Keras takes it): the rate times sqrt(1 - b2^t) / (1 - b1^t), t the
            # server steps taken so far, counted in the state (restored after a restart)
            t = int(state.arrays.get("t", np.array(0))) + 1
            state.arrays["t"] = np.array(t)
            step = step * (np.sqrt(1 - p.beta2 ** t) / (1 - p.beta1 ** t))
        return step


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment: ``v = v - (1-beta2) d^2 sign(v - d^2)``."""

    name = "fedyogi"

    def second_moment(self, v, delta):
        d2 = delta ** 2
        return v - (1 - self.params.beta2) * d2 * np.sign(v - d2)


class FedSGD(FedAdam):
    """FedSGD with the server's Adam at the hospitals: each round every hospital takes
    ``local_steps`` (default one) plain SGD steps at ``lr`` (no momentum, no clipping) on a
    fresh minibatch from the round's base and uploads the result. With one step at lr 1 its
    upload minus the base is minus its minibatch gradient, so the sample-weighted average
    minus the base is minus an unbiased estimate of the gradient over the union of the
    hospitals' data, however skewed their labels: ``sum n_i g_i / sum n_i``. Every hospital
    then takes the same Adam step with it (``server_lr``, ``beta1``, ``beta2``, ``tau`` as
    epsilon, ``bias_correction``): federated training follows central Adam on a minibatch
    made of every hospital's. Local training is ``training.sgd_steps``."""

    name = "fedsgd"


class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al. 2020), option I: each hospital's control variate is its
    mean data-loss gradient at the round's base model. Local steps follow ``g - c_i + c``; the
    upload is ``[trained model ; c_i+ - c_i]`` and the decrypted average gives both the new
    model and the change of the server control ``c`` (full participation: ``|S|/N = 1``)."""

    name = "scaffold"
    upload_factor = 2
    stateful = True

    @property
    def needs_gradient(self) -> bool:
        return True

    def local_objective(self, base, state):
        return LocalObjective(correction=(state.get("control") - state.get("client_control")))

    def upload(self, base, trained, state, gradient_at_base=None):
        if gradient_at_base is None:
            raise ValueError("scaffold needs the local gradient at the base model")
        new_client = np.asarray(gradient_at_base, dtype=np.float64)
        delta_c = new_client - state.get("client_control")
        state.arrays["next_client_control"] = new_client  # becomes c_i when the round closes
        model = np.asarray(trained, dtype=np.float64)
        base64 = np.asarray(base, dtype=np.float64)
        model = base64 + self.params.server_lr * (model - base64)
        return np.concatenate([model, delta_c]).astype(np.float32)

    def server_step(self, average, state):
        average = np.asarray(average, dtype=np.float64)
        n = average.size // 2
        state.arrays["control"] = state.get("control") + average[n:]
        if "next_client_control" in state.arrays:
            state.arrays["client_control"] = state.arrays.pop("next_client_control")
        return average[:n].astype(np.float32)


STRATEGY_CLASSES = {cls.name: cls for cls in (Strategy, FedProx, Scaffold, FedAvgM, FedAdam, FedYogi, FedSGD)}


def make(params, sizes=None) -> Strategy:
    """The strategy ``params.strategy`` names, configured by ``params``; ``sizes``: the model's
    tensor sizes in flat order (needed by the server step when ``server_clipnorm`` is set)."""
    return STRATEGY_CLASSES[params.strategy](params, sizes)


def advance(strategy: Strategy, state: ServerState, average: np.ndarray, aggregate_sha: str) -> ServerState:
    """The state after the round whose decrypted average is ``average``: idempotent (an
    aggregate already applied leaves the state as it is)."""
    if state.applied == aggregate_sha:
        return state
    expected = state.model.size * strategy.upload_factor
    if np.asarray(average).size != expected:
        raise ValueError(f"{strategy.name}: the aggregate has {np.asarray(average).size} values, "
                         f"expected {expected} (model of {state.model.size} x {strategy.upload_factor})")
    nxt = ServerState(model=state.model, applied=state.applied, arrays=dict(state.arrays))
    nxt.model = strategy.server_step(average, nxt)
    nxt.applied = aggregate_sha
    return nxt

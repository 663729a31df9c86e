"""Ring primitives for the threshold profile: Z_q[X]/(X^N + 1) in numpy.

Everything here is exact integer arithmetic on uint64 arrays whose values are below a prime
q < 2^32 (products then fit in 64 bits):

- :class:`NttRing`: one prime, its negacyclic NTT (batched over rows: shape (..., N)),
  pointwise products with Shoup's precomputation for a fixed operand.
- :class:`RnsRing`: a few such primes for a bigger modulus Q = q_1 * ... * q_L (the key
  layer: collective public key, key ciphertexts, Shamir shares, partial decryptions), with
  the CRT lift back to integers.
- Sampling: uniform polynomials expanded from a public seed (the common ``a``), ternary
  secrets, centered binomial noise and wide uniform smudging noise, the secret ones from the
  operating system's CSPRNG.

No state but precomputed tables; no module-level side effects.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import numpy as np

from .errors import CodecError
from .sampling import cbd_noise

_ZEROS = bytes(1 << 16)


class RingError(CodecError):
    """A polynomial or parameter that does not fit the ring."""


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (the bases below suffice)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@lru_cache(maxsize=16)
def ntt_primes(n: int, bits: int, count: int) -> tuple[int, ...]:
    """The ``count`` largest primes below 2^bits that are 1 modulo 2n (NTT-friendly)."""
    step = 2 * n
    candidate = ((1 << bits) - 1) // step * step + 1
    found = []
    while len(found) < count:
        if candidate < step:
            raise RingError(f"not enough {bits}-bit primes = 1 mod {step}")
        if candidate < (1 << bits) and is_prime(candidate):
            found.append(candidate)
        candidate -= step
    return tuple(found)


def _primitive_root_2n(q: int, n: int) -> int:
    """A primitive 2n-th root of unity modulo q (q = 1 mod 2n), deterministic."""
    order = 2 * n
    for g in range(2, q):
        psi = pow(g, (q - 1) // order, q)
        if pow(psi, n, q) == q - 1:  # order exactly 2n (n is a power of two)
            return psi
    raise RingError(f"no primitive {order}-th root modulo {q}")


def _bit_reverse(k: int, bits: int) -> int:
    return int(format(k, f"0{bits}b")[::-1], 2) if bits else 0


class NttRing:
    """Z_q[X]/(X^N + 1) for one NTT-friendly prime q < 2^32.

    ``forward`` maps coefficients to the NTT domain (bit-reversed order, Cooley-Tukey),
    ``inverse`` maps back (Gentleman-Sande); both work on the last axis of a (..., N) array,
    so a batch of chunks costs one numpy call per stage instead of one per chunk.
    """

    def __init__(self, n: int, q: int):
        if n < 2 or n & (n - 1):
            raise RingError(f"ring degree must be a power of two, got {n}")
        if not (2 < q < (1 << 32)) or (q - 1) % (2 * n) or not is_prime(q):
            raise RingError(f"modulus {q} is not a prime below 2^32 that is 1 mod {2 * n}")
        self.n, self.q = n, q
        self._q = np.uint64(q)
        bits = n.bit_length() - 1
        psi = _primitive_root_2n(q, n)
        psi_inv = pow(psi, q - 2, q)
        rev = [_bit_reverse(k, bits) for k in range(n)]
        self._w = np.array([pow(psi, r, q) for r in rev], dtype=np.uint64)
        self._w_inv = np.array([pow(psi_inv, r, q) for r in rev], dtype=np.uint64)
        self._w_shoup = self.shoup(self._w)
        self._w_inv_shoup = self.shoup(self._w_inv)
        n_inv = pow(n, q - 2, q)
        self._n_inv = np.uint64(n_inv)
        self._n_inv_shoup = np.uint64((n_inv << 32) // q)

    # modular helpers on uint64 arrays with values < q

    def shoup(self, w: np.ndarray) -> np.ndarray:
        """floor(w * 2^32 / q): the precomputation that makes ``mul_shoup`` division-free."""
        return ((np.asarray(w, dtype=np.uint64).astype(object) << 32) // self.q).astype(np.uint64)

    def mul_shoup(self, x: np.ndarray, w: np.ndarray, w_shoup: np.ndarray) -> np.ndarray:
        """x * w mod q for x, w < q < 2^32 (Shoup: the estimate is off by at most one q)."""
        hi = (x * w_shoup) >> np.uint64(32)
        r = x * w - hi * self._q  # exact modulo 2^64, and in [0, 2q)
        return np.minimum(r, r - self._q)

    def mul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x * y) % self._q

    def add(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        s = x + y
        return np.minimum(s, s - self._q)  # s - q wraps above s where s < q

    def sub(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        d = x + (self._q - y)
        return np.minimum(d, d - self._q)

    def neg(self, x: np.ndarray) -> np.ndarray:
        return np.where(x == 0, x, self._q - x)

    def from_signed(self, x: np.ndarray) -> np.ndarray:
        """Residues of signed int64 values (|x| < 2^62)."""
        return np.mod(np.asarray(x, dtype=np.int64), np.int64(self.q)).astype(np.uint64)

    def centered(self, x: np.ndarray) -> np.ndarray:
        """Signed representatives in (-q/2, q/2] of residues."""
        s = np.asarray(x, dtype=np.int64)
        return np.where(s > self.q // 2, s - np.int64(self.q), s)

    # transforms

    def forward(self, a: np.ndarray) -> np.ndarray:
        """NTT of coefficient rows (..., N) -> a new array (bit-reversed evaluation order)."""
        a = np.array(a, dtype=np.uint64, copy=True)
        n, lead = self.n, a.shape[:-1]
        m, t = 1, n
        while m < n:
            t //= 2
            view = a.reshape(*lead, m, 2, t)
            w = self._w[m : 2 * m].reshape(m, 1)
            ws = self._w_shoup[m : 2 * m].reshape(m, 1)
            u = view[..., 0, :].copy()
            v = self.mul_shoup(view[..., 1, :], w, ws)
            view[..., 0, :] = self.add(u, v)
            view[..., 1, :] = self.sub(u, v)
            m *= 2
        return a

    def inverse(self, a: np.ndarray) -> np.ndarray:
        """Coefficients of NTT rows (..., N) -> a new array."""
        a = np.array(a, dtype=np.uint64, copy=True)
        n, lead = self.n, a.shape[:-1]
        m, t = n // 2, 1
        while m >= 1:
            view = a.reshape(*lead, m, 2, t)
            w = self._w_inv[m : 2 * m].reshape(m, 1)
            ws = self._w_inv_shoup[m : 2 * m].reshape(m, 1)
            u = view[..., 0, :].copy()
            v = view[..., 1, :].copy()
            view[..., 0, :] = self.add(u, v)
            view[..., 1, :] = self.mul_shoup(self.sub(u, v), w, ws)
            m //= 2
            t *= 2
        return self.mul_shoup(a, self._n_inv, self._n_inv_shoup)

    def multiply(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The negacyclic product of coefficient polynomials (slow path: tests, small work)."""
        return self.inverse(self.mul(self.forward(x), self.forward(y)))


class RnsRing:
    """Z_Q[X]/(X^N + 1) with Q a product of NTT primes, as residue arrays of shape (L, ..., N)."""

    def __init__(self, n: int, primes: tuple[int, ...]):
        if len(set(primes)) != len(primes):
            raise RingError("RNS primes must be distinct")
        self.n = n
        self.primes = tuple(primes)
        self.rings = tuple(NttRing(n, q) for q in primes)
        self.modulus = 1
        for q in primes:
            self.modulus *= q

    def from_signed(self, x: np.ndarray) -> np.ndarray:
        return np.stack([r.from_signed(x) for r in self.rings])

    def from_int(self, value: int, shape=()) -> np.ndarray:
        """A constant (Python int, any size) as residues broadcast to ``shape``."""
        return np.stack([np.full(shape, value % q, dtype=np.uint64) for q in self.primes])

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.stack([r.forward(x[i]) for i, r in enumerate(self.rings)])

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return np.stack([r.inverse(x[i]) for i, r in enumerate(self.rings)])

    def add(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.stack([r.add(x[i], y[i]) for i, r in enumerate(self.rings)])

    def sub(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.stack([r.sub(x[i], y[i]) for i, r in enumerate(self.rings)])

    def mul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.stack([r.mul(x[i], y[i]) for i, r in enumerate(self.rings)])

    def scalar(self, x: np.ndarray, value: int) -> np.ndarray:
        """x * value mod Q for a Python integer ``value`` of any size."""
        return np.stack([r.mul(x[i], np.uint64(value % q)) for i, (r, q) in enumerate(zip(self.rings, self.primes))])

    def centered(self, x: np.ndarray) -> np.ndarray:
        """The CRT lift of coefficient residues (L, ...) to integers in (-Q/2, Q/2]: int64
        when Q < 2^63, else Python ints in an object array. Garner's mixed radix: every
        digit is computed in uint64 (primes below 2^32); only the final sum may be wide."""
        digits = [x[0].astype(np.uint64)]
        for i in range(1, len(self.primes)):
            q, ring = self.primes[i], self.rings[i]
            # value so far = sum_j digits[j] * prod(primes[:j]); digit_i = (r_i - value) / radix mod q_i
            value_mod = np.zeros_like(digits[0])
            radix_mod = 1
            for j, digit in enumerate(digits):
                value_mod = ring.add(value_mod, ring.mul(digit % np.uint64(q), np.uint64(radix_mod % q)))
                radix_mod = radix_mod * self.primes[j] % q
            radix = 1
            for p in self.primes[:i]:
                radix *= p
            digits.append(ring.mul(ring.sub(x[i], value_mod), np.uint64(pow(radix, -1, q))))
        wide = self.modulus >= 1 << 63
        total = np.zeros(digits[0].shape, dtype=object if wide else np.uint64)
        radix = 1
        for j, digit in enumerate(digits):
            total = total + (digit.astype(object) if wide else digit) * (radix if wide else np.uint64(radix))
            radix *= self.primes[j]
        half = self.modulus // 2
        if wide:
            return np.where(total > half, total - self.modulus, total)
        signed = total.astype(np.int64)
        return np.where(total > np.uint64(half), signed - np.int64(self.modulus), signed)

    def wide_uniform(self, bits: int) -> np.ndarray:
        """Residues (L, N) of N integers uniform in [-2^bits, 2^bits) (bits <= 120), from
        os.urandom: the committee's smudging noise. Drawn as hi * 2^60 + lo, hi uniform in
        [-2^(bits-60), 2^(bits-60)) and lo in [0, 2^60) (one uniform draw of bits + 1 bits)."""
        if bits <= 60:
            return self.from_signed(sample_wide_uniform(self.n, bits))
        if bits > 120:
            raise RingError(f"smudging width {bits} bits is out of range")
        lo = (np.frombuffer(os.urandom(8 * self.n), dtype="<u8") & np.uint64((1 << 60) - 1)).astype(np.int64)
        hi = sample_wide_uniform(self.n, bits - 60)
        return self.add(self.scalar(self.from_signed(hi), 1 << 60), self.from_signed(lo))

    def check(self, x: np.ndarray, what: str, rows: int | None = None) -> np.ndarray:
        """``x`` as a checked residue array: L rows of (rows,) N values, each below its prime."""
        arr = np.asarray(x)
        want = (len(self.primes), self.n) if rows is None else (len(self.primes), rows, self.n)
        if arr.shape != want or arr.dtype != np.uint64:
            raise RingError(f"{what}: shape {arr.shape} ({arr.dtype}), expected {want} uint64")
        for i, q in enumerate(self.primes):
            if arr[i].size and int(arr[i].max()) >= q:
                raise RingError(f"{what}: a residue is not reduced modulo {q}")
        return arr


# --------------------------------------------------------------------------- sampling


def _aes_ctr(key: bytes, nonce: bytes = bytes(16)):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()


def public_seed(domain: str, *parts) -> bytes:
    """A 32-byte public seed bound to a domain and its parts (e.g. federation, round)."""
    h = hashlib.sha256()
    for item in (domain, *parts):
        data = str(item).encode()
        h.update(len(data).to_bytes(4, "big") + data)
    return h.digest()


def expand_uniform(seed: bytes, stream: int, count: int, q: int) -> np.ndarray:
    """``count`` uniform residues modulo q < 2^32 from the public XOF (AES-256-CTR keyed by
    ``seed``, counter block = ``stream`` (8 bytes) || 0): 4-byte words >= q are skipped.
    Deterministic: every party expands the same polynomial."""
    if len(seed) != 32:
        raise RingError("an expansion seed is 32 bytes")
    cipher = _aes_ctr(seed, int(stream).to_bytes(8, "big") + bytes(8))
    out = np.empty(count, dtype=np.uint64)
    got = 0
    while got < count:
        want = count - got + 64
        words = np.frombuffer(cipher.update(_ZEROS[: 4 * want] if 4 * want <= len(_ZEROS) else bytes(4 * want)), dtype="<u4")
        kept = words[words < q][: count - got]
        out[got : got + kept.size] = kept
        got += kept.size
    return out


def expand_uniform_rows(seed: bytes, first: int, rows: int, n: int, q: int) -> np.ndarray:
    """Rows ``first`` .. ``first + rows - 1`` of the public uniform polynomials of ``seed``, uint32.

    Row r is words r*n .. r*n + n - 1 of the AES-256-CTR keystream of ``seed`` (counter from
    zero; 4-byte little-endian words), one keystream for the whole batch. A row holding a word
    >= q (probability ~ n (2^32 - q) / 2^32, 12% for the chunk prime) is replaced by the
    rejection-sampled :func:`expand_uniform` of stream 2^63 + r: the result is still exactly
    uniform modulo q, and any row can be expanded alone.
    """
    if len(seed) != 32:
        raise RingError("an expansion seed is 32 bytes")
    words_per_block = 4
    if (first * n) % words_per_block:
        raise RingError("rows must start on a keystream block")
    counter = (first * n // words_per_block).to_bytes(16, "big")
    stream = _aes_ctr(seed, counter).update(bytes(4 * n * rows))
    out = np.frombuffer(stream, dtype="<u4").reshape(rows, n).copy()
    for r in np.flatnonzero((out >= q).any(axis=1)):
        out[r] = expand_uniform(seed, (1 << 63) + first + int(r), n, q)
    return out


def secret_stream():
    """A keystream under a fresh random key: the CSPRNG the noise samplers draw from."""
    return _aes_ctr(os.urandom(32))


def sample_ternary(n: int) -> np.ndarray:
    """n coefficients uniform in {-1, 0, 1} (int64), from os.urandom (rejection of 255)."""
    out = np.empty(n, dtype=np.int64)
    got = 0
    while got < n:
        raw = np.frombuffer(os.urandom(n - got + 16), dtype=np.uint8)
        kept = raw[raw < 255][: n - got]
        out[got : got + kept.size] = (kept % 3).astype(np.int64) - 1
        got += kept.size
    return out


def sample_cbd(count: int, bits: int = 21, stream=None) -> np.ndarray:
    """Centered binomial noise (|e| <= bits, variance bits / 2; SEAL's for bits = 21) from a
    secret keystream (a fresh one if none is given)."""
    stream = stream or secret_stream()
    step = 1 << 14  # cbd_noise reads at most 2^17 bytes of keystream per call
    if count <= step:
        return cbd_noise(stream, count, bits)
    return np.concatenate([cbd_noise(stream, min(step, count - at), bits) for at in range(0, count, step)])


def sample_wide_uniform(count: int, bits: int) -> np.ndarray:
    """Uniform integers in [-2^bits, 2^bits) (bits <= 61), from os.urandom: smudging noise."""
    if not 1 <= bits <= 61:
        raise RingError(f"smudging width {bits} bits is out of range")
    words = np.frombuffer(os.urandom(8 * count), dtype="<u8")
    span = np.uint64((1 << (bits + 1)) - 1)
    return (words & span).astype(np.int64) - np.int64(1 << bits)


@lru_cache(maxsize=8)
def ntt_ring(n: int, q: int) -> NttRing:
    """Shared tables per (n, q): building them costs ~10 ms."""
    return NttRing(n, q)


@lru_cache(maxsize=4)
def rns_ring(n: int, primes: tuple[int, ...]) -> RnsRing:
    return RnsRing(n, primes)

"""Fixtures shared by the fast worker tests: one compact key pair per module and a fresh
in-process federation (embedded broker, local store, registered identities) per test."""
from __future__ import annotations

import pytest

from cxr_mq import crypto
from workerkit import Federation


@pytest.fixture(scope="module")
def codecs():
    """(secret, public) compact codecs."""
    pair = crypto.generate_keys("compact")
    return crypto.load_context(pair.secret), crypto.load_context(pair.public)


@pytest.fixture
def fed(tmp_path, codecs):
    return Federation(tmp_path, *codecs)

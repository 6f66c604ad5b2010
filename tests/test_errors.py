"""The exceptions jaxmt raises survive pickling (a Ray Serve handle or a process pool sends
them to the caller that way) with their message and attributes intact."""

from __future__ import annotations

import copy
import pickle

import pytest

from jaxmt import ManifestError, NonFiniteLossError, UnknownTenantError


@pytest.mark.parametrize(
    "error",
    [UnknownTenantError("t1", 3), UnknownTenantError(("a", 1)), NonFiniteLossError("loss of ['a'] is NaN", ["a"], 7),
     ManifestError("manifest m line 4: bad", 4)],
    ids=["unknown-tenant", "unknown-tenant-no-count", "nonfinite-loss", "manifest"],
)
@pytest.mark.parametrize("round_trip", [lambda e: pickle.loads(pickle.dumps(e)), copy.copy], ids=["pickle", "copy"])
def test_errors_survive_pickling_and_copying(error, round_trip):
    got = round_trip(error)
    assert type(got) is type(error)
    assert str(got) == str(error)
    assert got.__dict__ == error.__dict__

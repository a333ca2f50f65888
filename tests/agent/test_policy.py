import datetime
import os

import pytest

from certrotate import policy
from certrotate.policy import DAY, Validity
from pki import TestPki, cert_pem

V = Validity(not_before=0.0, not_after=300 * DAY)


@pytest.mark.parametrize("now, fraction, max_age, expect", [
    (100 * DAY, 0.667, 365, None),
    (201 * DAY, 0.667, 365, "67% of its validity"),
    (50 * DAY, 0.667, 30, "50 days old"),
    (301 * DAY, 0.667, 365, "expired"),
    (150 * DAY, 0.5, 365, "50% of its validity"),
])
def test_due(now, fraction, max_age, expect):
    why = policy.due(V, now, fraction, max_age)
    assert (why is None) if expect is None else (expect in why)


def test_validity_cache_is_keyed_by_the_certificate_file(tmp_path):
    pki = TestPki()
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    identity = pki.device(not_before=start, not_after=start + datetime.timedelta(days=10))
    cert_file = tmp_path / "client.pem"
    cert_file.write_bytes(cert_pem(identity.cert))
    assert policy.cached_validity(tmp_path, cert_file) is None
    validity = policy.read_validity(tmp_path, cert_file)
    assert validity == Validity(start.timestamp(), start.timestamp() + 10 * DAY)
    assert policy.cached_validity(tmp_path, cert_file) == validity
    # A new certificate in the same file (other size or mtime) misses the cache.
    other = pki.device(not_before=start, not_after=start + datetime.timedelta(days=20))
    cert_file.write_bytes(cert_pem(other.cert))
    os.utime(cert_file, ns=(1, 1))
    assert policy.cached_validity(tmp_path, cert_file) is None
    assert policy.read_validity(tmp_path, cert_file).not_after == start.timestamp() + 20 * DAY

import pytest

from certrotate import config
from certrotate.config import ConfigError, Root
from pki import SOTA_TOML, TestPki, write_device_tree


@pytest.fixture
def device(tmp_path):
    return write_device_tree(tmp_path / "dev", TestPki(), est_url="https://127.0.0.1:1/.well-known/est")


def test_reads_sota_toml_under_root(device):
    sota = config.load_sota(Root(device.root))
    assert sota.gateway_url == "https://127.0.0.1:8443"
    assert (sota.ca_file, sota.key_file, sota.cert_file) == (
        "/var/sota/root.crt", "/var/sota/pkey.pem", "/var/sota/client.pem")
    assert sota.origins["import.tls_pkey_path"] == "/var/sota/sota.toml"


def test_conf_d_merges_key_by_key_in_aktualizr_order(device):
    usr = device.root / "usr/lib/sota/conf.d"
    etc = device.root / "etc/sota/conf.d"
    usr.mkdir(parents=True)
    etc.mkdir(parents=True)
    (usr / "10-base.toml").write_text('[tls]\nserver = "https://usr:1"\n[import]\ntls_pkey_path = "usr.pem"\n')
    (etc / "20-b.toml").write_text('[import]\nbase_path = "/data/sota"\ntls_clientcert_path = "c.pem"\n')
    (etc / "10-a.toml").write_text('[tls]\nserver = "https://etc-a:1"\n')
    sota = config.load_sota(Root(device.root))
    assert sota.gateway_url == "https://etc-a:1"  # /etc wins over /var and /usr
    assert sota.key_file == "/var/sota/pkey.pem"  # /var/sota/sota.toml wins over /usr/lib
    assert sota.cert_file == "/data/sota/c.pem"  # relative to the effective base_path
    assert sota.origins["import.tls_clientcert_path"] == "/etc/sota/conf.d/20-b.toml"


def test_point_tls_at_changes_only_the_two_lines(device):
    root = Root(device.root)
    original = device.sota_toml.read_text()
    sota = config.load_sota(root)
    config.point_tls_at(root, sota, "/var/sota/pkey-certs-1.pem", "/var/sota/client-certs-1.pem", point="t:sota")
    expected = original.replace('tls_clientcert_path = "/var/sota/client.pem"',
                                'tls_clientcert_path = "/var/sota/client-certs-1.pem"')
    expected = expected.replace('tls_pkey_path = "/var/sota/pkey.pem"', 'tls_pkey_path = "/var/sota/pkey-certs-1.pem"')
    assert device.sota_toml.read_text() == expected
    assert device.sota_toml.stat().st_mode & 0o777 == 0o644
    reread = config.load_sota(root)
    assert (reread.key_file, reread.cert_file) == ("/var/sota/pkey-certs-1.pem", "/var/sota/client-certs-1.pem")


def test_point_tls_at_edits_the_file_that_defines_the_effective_value(device):
    root = Root(device.root)
    override = device.root / "etc/sota/conf.d/50-hsm.toml"
    override.parent.mkdir(parents=True)
    override.write_text("# local override\n[import]\ntls_pkey_path = '/var/sota/other.pem'  # keep me\n")
    before_var = device.sota_toml.read_text()
    sota = config.load_sota(root)
    config.point_tls_at(root, sota, "/var/sota/new.pem", "/var/sota/client-new.pem", point="t:sota")
    assert override.read_text() == '# local override\n[import]\ntls_pkey_path = "/var/sota/new.pem"  # keep me\n'
    assert device.sota_toml.read_text() == before_var.replace("/var/sota/client.pem", "/var/sota/client-new.pem")


def test_missing_sota_toml_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.load_sota(Root(tmp_path))
    assert "provision" in err.value.hint


def test_malformed_sota_toml(device):
    device.sota_toml.write_text(SOTA_TOML.format(gateway_url="x") + "[broken\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load_sota(Root(device.root))


def test_agent_config_defaults_and_values(device, tmp_path):
    assert config.load_agent(Root(tmp_path)) == config.AgentConfig()
    agent = config.load_agent(Root(device.root))
    assert agent.est_server == "https://127.0.0.1:1/.well-known/est"
    assert agent.lifetime_fraction == 0.667 and agent.max_age_days == 365.0
    assert agent.state_dir == "/var/sota/certrotate"


@pytest.mark.parametrize("text, message", [
    ("[renewal]\nlifetime_fraction = 2\n", "lifetime_fraction must be in"),
    ("[renewal]\nmax_age_days = \"x\"\n", "max_age_days must be a float"),
    ("[renewal]\nmax_age_days = 0\n", "max_age_days must be more than 0, not 0"),
    ("[renewal]\nmax_age_days = -5\n", "max_age_days must be more than 0, not -5"),
    ("[services]\nrestart = [1]\n", "list of unit names"),
    ("est = 1\n", "est must be a table"),
])
def test_agent_config_rejects_bad_values(device, text, message):
    device.certrotate_toml.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load_agent(Root(device.root))


@pytest.mark.bad_input("agent time bound out of range")
@pytest.mark.parametrize("text, message", [
    ("[deadlines]\nrun = 3600\n", r"deadlines.run must be more than 0 and at most 1200 seconds, not 3600"),
    ("[deadlines]\nrequest = 0\n", r"deadlines.request must be more than 0 seconds, not 0"),
    ("[est]\nmax_wait = -1\n", r"est.max_wait must be more than 0 seconds, not -1"),
])
def test_agent_time_bounds_are_checked(device, text, message):
    # A run longer than certrotate.service's TimeoutStartSec would be killed part way.
    device.certrotate_toml.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load_agent(Root(device.root))


P11_SECTION = ('\n[p11]\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\npass = "87654321"\n'
               'tls_pkey_id = "01"\ntls_clientcert_id = "03"\n')


def token_sota(device, extra: str = P11_SECTION, key_source: str = "pkcs11", cert_source: str | None = "pkcs11"):
    """sota.toml as lmp-device-register writes it for a token-held identity."""
    path = device.root / "var/sota/sota.toml"
    text = path.read_text().replace('pkey_source = "file"', f'pkey_source = "{key_source}"')
    text = text.replace('cert_source = "file"\n', f'cert_source = "{cert_source}"\n' if cert_source else "")
    path.write_text(text + extra)
    return path


def test_a_token_identity_is_read_from_p11(device):
    token_sota(device)
    sota = config.load_sota(Root(device.root))
    assert (sota.key_file, sota.cert_file) == ("", "")
    p11 = sota.p11
    assert (p11.module, p11.pin, p11.label, p11.key_id, p11.cert_id) == (
        "/usr/lib/softhsm/libsofthsm2.so", "87654321", "aktualizr", b"\x01", b"\x03")
    assert "87654321" not in repr(p11)


def test_cert_source_follows_the_key_source_when_unset(device):
    token_sota(device, cert_source=None)  # fioconfig reads only tls.pkey_source
    assert config.load_sota(Root(device.root)).p11.key_id == b"\x01"


@pytest.mark.bad_input("sota.toml token settings")
def test_a_key_and_certificate_kept_apart_are_refused(device):
    token_sota(device, cert_source="file")
    with pytest.raises(ConfigError, match="tls.pkey_source and tls.cert_source are file, pkcs11") as err:
        config.load_sota(Root(device.root))
    assert 'both to "pkcs11"' in err.value.hint


@pytest.mark.bad_input("sota.toml token settings")
@pytest.mark.parametrize("value", ["1", "10", "0a", "00", "0102"])
def test_ids_aktualizr_and_fioconfig_read_apart_are_refused(device, value):
    token_sota(device, P11_SECTION.replace('tls_pkey_id = "01"', f'tls_pkey_id = "{value}"'))
    with pytest.raises(ConfigError, match=f"p11.tls_pkey_id in /var/sota/sota.toml is '{value}'") as err:
        config.load_sota(Root(device.root))
    assert "aktualizr and fioconfig read other ids as different objects" in err.value.hint


@pytest.mark.bad_input("sota.toml token settings")
def test_a_token_identity_without_a_pin_says_where_to_set_it(device):
    token_sota(device, P11_SECTION.replace('pass = "87654321"\n', ""))
    with pytest.raises(ConfigError, match="sota.toml sets no p11.pass"):
        config.load_sota(Root(device.root))


def test_point_p11_at_changes_only_the_two_ids(device):
    path = token_sota(device)
    before = path.read_text()
    root = Root(device.root)
    sota = config.load_sota(root)
    config.point_p11_at(root, sota, b"\x07", b"\x09", point="t:sota")
    after = path.read_text()
    assert after == before.replace('tls_pkey_id = "01"', 'tls_pkey_id = "07"').replace(
        'tls_clientcert_id = "03"', 'tls_clientcert_id = "09"')
    assert (sota.p11.key_id, sota.p11.cert_id) == (b"\x07", b"\x09")
    assert config.load_sota(root).p11.cert_id == b"\x09"

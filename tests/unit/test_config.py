import subprocess
import sys

import pytest

from cxr_mq.config import ConfigError, load_settings


def test_precedence_flags_then_env_then_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('s3_bucket = "from-file"\nnamespace = "filens"\nkms_key_id = "k-file"\n')
    env = {"CXR_MQ_S3_BUCKET": "from-env"}
    settings = load_settings(flags={"s3_bucket": "from-flag"}, env=env, config_path=config)
    assert settings.s3_bucket == "from-flag"
    settings = load_settings(env=env, config_path=config)
    assert settings.s3_bucket == "from-env"
    assert settings.namespace == "filens"
    assert settings.kms_key_id == "k-file"


def test_config_file_from_environment_and_section(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[cxr_mq]\namqp_url = "amqp://u:p@host:5672/%2F"\nhospitals = ["a", "b"]\n')
    settings = load_settings(env={"CXR_MQ_CONFIG": str(config)})
    assert settings.amqp_url.startswith("amqp://")
    assert settings.hospitals == ("a", "b")


def test_aws_region_from_standard_variables():
    assert load_settings(env={"AWS_DEFAULT_REGION": "eu-west-1"}).aws_region == "eu-west-1"
    assert load_settings(env={"AWS_REGION": "eu-central-1", "CXR_MQ_AWS_REGION": "us-east-2"}).aws_region == "us-east-2"


@pytest.mark.parametrize("env, key", [
    ({"CXR_MQ_AMQP_URL": "http://broker"}, "CXR_MQ_AMQP_URL"),
    ({"CXR_MQ_S3_BUCKET": "Not_A_Bucket"}, "CXR_MQ_S3_BUCKET"),
    ({"CXR_MQ_S3_ENDPOINT_URL": "localhost:9000"}, "CXR_MQ_S3_ENDPOINT_URL"),
    ({"CXR_MQ_HOSPITALS": "ok,bad id"}, "CXR_MQ_HOSPITALS"),
    ({"CXR_MQ_CODEC_PROFILE": "fast"}, "CXR_MQ_CODEC_PROFILE"),
    ({"CXR_MQ_NAMESPACE": "a/b"}, "CXR_MQ_NAMESPACE"),
])
def test_invalid_values_name_the_key(env, key):
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert info.value.key == key


def test_missing_required_and_missing_secret_context(tmp_path):
    settings = load_settings(env={})
    with pytest.raises(ConfigError, match="CXR_MQ_S3_BUCKET: is required"):
        settings.require("s3_bucket")
    settings = load_settings(env={"CXR_MQ_SECRET_CONTEXT": str(tmp_path / "nope.ctx")})
    with pytest.raises(ConfigError, match="CXR_MQ_SECRET_CONTEXT: no such file"):
        settings.secret_context_path()


def test_bad_toml_and_unknown_keys(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("s3_bucket = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(env={}, config_path=bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('s3_buckett = "x"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(env={}, config_path=unknown)


def test_redacts_password_in_amqp_error():
    with pytest.raises(ConfigError) as info:
        load_settings(env={"CXR_MQ_AMQP_URL": "http://user:hunter2@host"})
    assert "hunter2" not in str(info.value)


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CXR_MQ_S3_BUCKET": "Bad_Bucket"}
    result = subprocess.run([sys.executable, "-m", "cxr_mq.cli", "status"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CXR_MQ_S3_BUCKET" in lines[0], result.stderr


def test_typed_settings_from_environment_and_toml(tmp_path):
    env = {"CXR_MQ_AMQP_TLS_REQUIRED": "true", "CXR_MQ_RETAIN_UPDATES": "0",
           "CXR_MQ_KEEP_PLAINTEXT_UPDATES": "3", "CXR_MQ_AMQP_CA_FILE": "/etc/ca.pem"}
    settings = load_settings(env=env)
    assert settings.amqp_tls_required is True and settings.retain_updates is False
    assert settings.keep_plaintext_updates == 3 and settings.amqp_ca_file == "/etc/ca.pem"
    config = tmp_path / "c.toml"
    config.write_text("amqp_tls_required = true\nretain_updates = true\nkeep_plaintext_updates = 2\n")
    settings = load_settings(env={}, config_path=config)
    assert (settings.amqp_tls_required, settings.retain_updates, settings.keep_plaintext_updates) == (True, True, 2)
    defaults = load_settings(env={})
    assert (defaults.amqp_tls_required, defaults.retain_updates, defaults.keep_plaintext_updates) == (False, False, 0)


@pytest.mark.parametrize("env, key", [
    ({"CXR_MQ_AMQP_TLS_REQUIRED": "maybe"}, "CXR_MQ_AMQP_TLS_REQUIRED"),
    ({"CXR_MQ_KEEP_PLAINTEXT_UPDATES": "-1"}, "CXR_MQ_KEEP_PLAINTEXT_UPDATES"),
])
def test_invalid_typed_values_name_the_key(env, key):
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert info.value.key == key


def test_amqp_url_takes_a_clusters_nodes_and_names_a_bad_one():
    from cxr_mq.transport.rabbitmq import split_urls
    urls = "amqp://u:p@n1:5672/%2F, amqp://u:p@n2:5673/%2F,amqp://u:p@n3:5674/%2F"
    settings = load_settings(env={"CXR_MQ_AMQP_URL": urls})
    assert split_urls(settings.amqp_url) == ["amqp://u:p@n1:5672/%2F", "amqp://u:p@n2:5673/%2F",
                                             "amqp://u:p@n3:5674/%2F"]
    with pytest.raises(ConfigError, match=r"CXR_MQ_AMQP_URL.*http://u:\*\*\*@n2") as err:
        load_settings(env={"CXR_MQ_AMQP_URL": "amqp://u:p@n1/%2F,http://u:secret@n2/"})
    assert "secret" not in str(err.value)


def test_aggregator_lease_is_a_whole_number_of_seconds():
    assert load_settings(env={"CXR_MQ_AGGREGATOR_LEASE": "10"}).aggregator_lease == 10
    assert load_settings(env={}).aggregator_lease == 0
    with pytest.raises(ConfigError, match="CXR_MQ_AGGREGATOR_LEASE"):
        load_settings(env={"CXR_MQ_AGGREGATOR_LEASE": "soon"})

"""A config file holding secrets that other users can read is reported at start (issue 19, item 9)."""

from __future__ import annotations

import logging

import pytest

from services.settings import read_file

SECRET_CONFIGS = {
    "tokens": '[auth]\ntokens = { "tenant-token-0123456789" = "alice" }\n',
    "store secret": '[store]\nsecret = "0123456789abcdef0123456789abcdef"\ncpu_bytes = 1024\n',
    "redis password": '[store]\nredis_url = "redis://:hunter2hunter2@redis:6379/0"\n',
}


@pytest.mark.parametrize("text", SECRET_CONFIGS.values(), ids=SECRET_CONFIGS.keys())
@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_a_config_with_secrets_readable_by_others_is_warned_about_by_name(tmp_path, caplog, text, mode):
    path = tmp_path / "serve.toml"
    path.write_text(text)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="services.settings"):
        read_file(path)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in warning and "chmod 600" in warning
    assert "hunter2" not in warning and "0123456789" not in warning  # never the secret itself


@pytest.mark.parametrize(("text", "mode"), [(SECRET_CONFIGS["tokens"], 0o600),
                                            ('[server]\nport = 50051\n[store]\nredis_url = "redis://r:6379/0"\n',
                                             0o644)])
def test_an_owner_only_config_or_one_without_secrets_is_not_warned_about(tmp_path, caplog, text, mode):
    path = tmp_path / "serve.toml"
    path.write_text(text)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="services.settings"):
        read_file(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

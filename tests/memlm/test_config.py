"""Settings precedence: keyword arguments > MEMLM_* environment > TOML file > defaults."""
import pytest
from pydantic import ValidationError

from memlm.config import Settings


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEMLM_CONFIG", raising=False)
    s = Settings()
    assert (s.server.host, s.server.port, s.server.api_key) == ("127.0.0.1", 50051, None)
    assert s.store.default_chunk_tokens == 64 and s.store.default_index_factory == "Flat"


def test_toml_then_env_then_kwargs(monkeypatch, tmp_path):
    toml = tmp_path / "memlm.toml"
    toml.write_text('data_dir = "/srv/memlm"\n[server]\nport = 6000\napi_key = "from-toml"\n[store]\nmax_k = 77\n')
    monkeypatch.setenv("MEMLM_CONFIG", str(toml))
    s = Settings()
    assert (str(s.data_dir), s.server.port, s.server.api_key, s.store.max_k) == ("/srv/memlm", 6000, "from-toml", 77)
    monkeypatch.setenv("MEMLM_SERVER__PORT", "7000")
    assert Settings().server.port == 7000 and Settings().server.api_key == "from-toml"
    assert str(Settings(data_dir="/elsewhere").data_dir) == "/elsewhere"


def test_invalid_settings_name_the_field(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEMLM_STORE__MAX_K", "0")
    with pytest.raises(ValidationError, match="max_k"):
        Settings()
    monkeypatch.delenv("MEMLM_STORE__MAX_K")
    monkeypatch.setenv("MEMLM_SERVER__TLS_CERT", "/tmp/cert.pem")
    with pytest.raises(ValidationError, match="tls_cert and tls_key"):
        Settings()
    monkeypatch.delenv("MEMLM_SERVER__TLS_CERT")
    monkeypatch.setenv("MEMLM_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        Settings()

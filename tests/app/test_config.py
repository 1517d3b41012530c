"""Settings precedence: defaults < YAML file < AIPD_* environment < command-line overrides."""

from pathlib import Path

import pytest

from app.config import ConfigError, Settings, load_settings


def test_defaults_put_everything_under_the_work_dir(tmp_path: Path) -> None:
    settings = load_settings(work_dir=tmp_path)
    assert settings.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert settings.demo_data_dir.parent == tmp_path / "data"
    assert settings.default_model_uri == "models:/aipd-detector@champion"
    assert settings.local_num_cpus >= 8, "Ray deadlocks on 2 logical CPUs"


def test_yaml_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "aipd.yaml"
    config.write_text("train:\n  epochs: 3\n  batch_size: 16\n  lr: 0.01\nlog_format: json\n")
    from_file = load_settings(config)
    assert (from_file.train.epochs, from_file.train.batch_size, from_file.log_format) == (3, 16, "json")

    monkeypatch.setenv("AIPD_TRAIN__EPOCHS", "5")
    from_env = load_settings(config)
    assert from_env.train.epochs == 5
    assert from_env.train.batch_size == 16, "env for one field must not reset the file's siblings"

    from_flags = load_settings(config, train={"epochs": 7, "lr": None})
    assert from_flags.train.epochs == 7
    assert from_flags.train.lr == 0.01, "an unset flag (None) must not hide the file's value"
    assert from_flags.train.batch_size == 16


def test_api_keys_from_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPD_API_KEYS", "alpha, beta,,gamma")
    assert load_settings().api_keys == ["alpha", "beta", "gamma"]
    monkeypatch.setenv("AIPD_API_KEYS", "")
    assert load_settings().api_keys == []


def test_log_format_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPD_LOG_FORMAT", "json")
    assert load_settings().log_format == "json"


def test_bad_files_and_values_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(Exception, match="trian"):
        load_settings(unknown)
    with pytest.raises(Exception, match="epochs"):
        Settings(train={"epochs": 0})


def test_rays_own_address_variable_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert load_settings().ray_address == "10.0.0.5:6379"
    assert load_settings(ray_address="auto").ray_address == "auto", "a flag wins over the environment"

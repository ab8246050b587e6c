"""Tests for sttd.settings: defaults, parsing and validation of every ``STT_*`` variable."""

from __future__ import annotations

import re

import attrs
import pytest

from sttd.errors import ConfigError
from sttd.settings import BACKENDS, Settings

# The spec's defaults, by environment variable.
SPEC_DEFAULTS: dict[str, object] = {
    "STT_BACKEND": "auto",
    "STT_HOST": "0.0.0.0",
    "STT_PORT": 8000,
    "STT_IN_QUEUE_SIZE": 200,
    "STT_IN_QUEUE_MAX_DROPS": 500,
    "STT_OUT_QUEUE_SIZE": 50,
    "STT_MAX_UPLOAD_BYTES": 104857600,
    "STT_VAD_THRESHOLD": 300,
    "STT_VAD_SILENCE_MS": 500,
    "STT_STREAMING_CHUNK_SIZE_SEC": 0.5,
    "STT_MAX_INFERENCE_BATCH_SIZE": 32,
    "STT_LOG_LEVEL": "INFO",
    "STT_LOG_FORMAT": "text",
}

INT_VARS = [
    "STT_PORT",
    "STT_IN_QUEUE_SIZE",
    "STT_IN_QUEUE_MAX_DROPS",
    "STT_OUT_QUEUE_SIZE",
    "STT_MAX_UPLOAD_BYTES",
    "STT_VAD_SILENCE_MS",
    "STT_MAX_INFERENCE_BATCH_SIZE",
    "STT_INFERENCE_LANES",
    "STT_MAX_SESSIONS",
    "STT_MAX_MESSAGE_BYTES",
    "STT_MAX_UPLOADS",
]
FLOAT_VARS = [
    "STT_VAD_THRESHOLD",
    "STT_MAX_UTTERANCE_S",
    "STT_STREAMING_CHUNK_SIZE_SEC",
    "STT_SHUTDOWN_GRACE_S",
    "STT_MAX_SESSION_S",
    "STT_IDLE_TIMEOUT_S",
    "STT_HTTP_READ_TIMEOUT_S",
    "STT_MAX_LAG_S",
    "STT_DRAIN_S",
    "STT_INFERENCE_TIMEOUT_S",
    "STT_SEND_TIMEOUT_S",
]
# Variables that must be > 0 (zero is refused).
POSITIVE_VARS = [
    "STT_IN_QUEUE_SIZE",
    "STT_OUT_QUEUE_SIZE",
    "STT_MAX_UPLOAD_BYTES",
    "STT_VAD_THRESHOLD",
    "STT_VAD_SILENCE_MS",
    "STT_MAX_UTTERANCE_S",
    "STT_STREAMING_CHUNK_SIZE_SEC",
    "STT_MAX_INFERENCE_BATCH_SIZE",
    "STT_MAX_UPLOADS",
    "STT_SEND_TIMEOUT_S",
    "STT_MAX_SESSION_S",
    "STT_IDLE_TIMEOUT_S",
    "STT_MAX_MESSAGE_BYTES",
    "STT_HTTP_READ_TIMEOUT_S",
    "STT_MAX_LAG_S",
    "STT_INFERENCE_TIMEOUT_S",
]
# Variables where zero is allowed but a negative value is not.
NON_NEGATIVE_VARS = ["STT_IN_QUEUE_MAX_DROPS", "STT_SHUTDOWN_GRACE_S", "STT_MAX_SESSIONS",
                     "STT_DRAIN_S", "STT_INFERENCE_LANES"]


def _field(variable: str) -> str:
    return variable.removeprefix("STT_").lower()


def _config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    return str(info.value)


# --- defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize(("variable", "expected"), SPEC_DEFAULTS.items(), ids=list(SPEC_DEFAULTS))
def test_spec_default(variable: str, expected: object) -> None:
    assert getattr(Settings.from_env({}), _field(variable)) == expected


def test_empty_env_equals_default_constructor() -> None:
    assert Settings.from_env({}) == Settings()


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]  # the point of the test


def test_non_stt_keys_are_ignored() -> None:
    env = {"PATH": "/usr/bin", "PORT": "not a number", "stt_port": "x", "XSTT_PORT": "y", "STTPORT": "z"}
    assert Settings.from_env(env) == Settings()


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", INT_VARS)
def test_int_variables_parse(variable: str) -> None:
    value = getattr(Settings.from_env({variable: " 1234 "}), _field(variable))
    assert value == 1234
    assert type(value) is int


@pytest.mark.parametrize("variable", FLOAT_VARS)
@pytest.mark.parametrize(("raw", "expected"), [("2.5", 2.5), ("7", 7.0), ("1e3", 1000.0)])
def test_float_variables_parse(variable: str, raw: str, expected: float) -> None:
    value = getattr(Settings.from_env({variable: raw}), _field(variable))
    assert value == expected
    assert type(value) is float


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_choice(backend: str) -> None:
    assert Settings.from_env({"STT_BACKEND": backend}).backend == backend


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
def test_log_level_choices_case_insensitive(level: str) -> None:
    assert Settings.from_env({"STT_LOG_LEVEL": level}).log_level == level
    assert Settings.from_env({"STT_LOG_LEVEL": f" {level.lower()} "}).log_level == level


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_log_format_choices(log_format: str) -> None:
    assert Settings.from_env({"STT_LOG_FORMAT": log_format}).log_format == log_format


def test_strings_are_taken_as_given() -> None:
    settings = Settings.from_env({"STT_HOST": "127.0.0.1", "STT_MOCK_REFERENCES_DIR": "/tmp/refs"})
    assert (settings.host, settings.mock_references_dir) == ("127.0.0.1", "/tmp/refs")


def test_many_variables_at_once() -> None:
    settings = Settings.from_env(
        {"STT_BACKEND": "mock", "STT_PORT": "0", "STT_IN_QUEUE_MAX_DROPS": "0", "STT_VAD_THRESHOLD": "150.5",
         "HOME": "/root"}
    )
    assert settings == Settings(backend="mock", port=0, in_queue_max_drops=0, vad_threshold=150.5)


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_port_bounds_accepted(port: int) -> None:
    assert Settings.from_env({"STT_PORT": str(port)}).port == port


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", INT_VARS)
@pytest.mark.parametrize("raw", ["abc", "", "1.5", "12abc"])
def test_int_variable_rejects_non_integer(variable: str, raw: str) -> None:
    assert _config_error({variable: raw}) == f"{variable} must be a number (int), got {raw!r}"


@pytest.mark.parametrize("variable", FLOAT_VARS)
@pytest.mark.parametrize("raw", ["abc", "", "1,5"])
def test_float_variable_rejects_non_number(variable: str, raw: str) -> None:
    assert _config_error({variable: raw}) == f"{variable} must be a number (float), got {raw!r}"


@pytest.mark.parametrize("variable", POSITIVE_VARS)
@pytest.mark.parametrize("raw", ["0", "-1"])
def test_positive_variable_rejects_zero_and_negative(variable: str, raw: str) -> None:
    message = _config_error({variable: raw})
    assert re.fullmatch(rf"{variable} must be > 0, got -?[01](\.0)?", message), message


@pytest.mark.parametrize("variable", NON_NEGATIVE_VARS)
def test_non_negative_variable_accepts_zero_rejects_negative(variable: str) -> None:
    assert getattr(Settings.from_env({variable: "0"}), _field(variable)) == 0
    message = _config_error({variable: "-1"})
    assert re.fullmatch(rf"{variable} must be >= 0, got -1(\.0)?", message), message


@pytest.mark.parametrize("port", ["-1", "65536", "100000"])
def test_port_out_of_range(port: str) -> None:
    assert _config_error({"STT_PORT": port}) == f"STT_PORT must be in 0..65535, got {port}"


@pytest.mark.parametrize(
    ("variable", "raw", "accepts"),
    [
        ("STT_BACKEND", "gpu", "auto, mock, whisper, qwen3, remote, nemo"),
        ("STT_LOG_LEVEL", "verbose", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("STT_LOG_FORMAT", "xml", "text, json"),
        ("STT_LOG_FORMAT", "", "text, json"),
    ],
)
def test_bad_choice(variable: str, raw: str, accepts: str) -> None:
    shown = raw.upper() if variable == "STT_LOG_LEVEL" else raw
    assert _config_error({variable: raw}) == f"{variable} must be one of {accepts}, got {shown!r}"


def test_choices_are_case_insensitive() -> None:
    settings = Settings.from_env({"STT_BACKEND": "MOCK", "STT_LOG_FORMAT": "JSON",
                                  "STT_LOG_LEVEL": "debug"})
    assert (settings.backend, settings.log_format, settings.log_level) == ("mock", "json", "DEBUG")


def test_empty_host_rejected() -> None:
    assert "STT_HOST" in _config_error({"STT_HOST": ""})


@pytest.mark.parametrize("key", ["STT_FOO", "STT_", "STT_PORTS", "STT_VAD_THRESHOLD_DB",
                                 "STT_port"])
def test_unknown_stt_key_rejected(key: str) -> None:
    message = _config_error({key: "1"})
    assert message.startswith(f"unknown setting {key}; known settings are: STT_BACKEND, STT_HOST, STT_PORT, ")
    for variable in SPEC_DEFAULTS:
        assert variable in message


def test_unknown_key_rejected_even_beside_valid_ones() -> None:
    assert _config_error({"STT_PORT": "80", "STT_COLOR": "blue"}).startswith("unknown setting STT_COLOR;")


def test_config_error_is_raised_without_chained_validator_error() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"STT_PORT": "70000"})
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    ("variable", "raw"),
    [("STT_MAX_UTTERANCE_S", "inf"), ("STT_SHUTDOWN_GRACE_S", "nan"), ("STT_STREAMING_CHUNK_SIZE_SEC", "inf")],
)
def test_non_finite_float_rejected(variable: str, raw: str) -> None:
    assert _config_error({variable: raw}).startswith(f"{variable} must be ")


@pytest.mark.parametrize("raw", ["0", "-0.1", "1.01", "nan"])
def test_background_share_must_be_a_fraction(raw: str) -> None:
    assert "STT_BACKGROUND_SHARE" in _config_error({"STT_BACKGROUND_SHARE": raw})


@pytest.mark.parametrize("raw", ["0.05", "1"])
def test_background_share_accepts_fractions(raw: str) -> None:
    assert Settings.from_env({"STT_BACKGROUND_SHARE": raw}).background_share == float(raw)


def test_secrets_stay_out_of_the_settings_repr() -> None:
    settings = Settings.from_env({"STT_API_KEYS": "sk-one,sk-two", "STT_METRICS_TOKEN": "mt-x"})
    assert settings.api_keys == "sk-one,sk-two"
    for secret in ("sk-one", "sk-two", "mt-x"):
        assert secret not in repr(settings)


def test_a_renamed_setting_names_its_new_name() -> None:
    with pytest.raises(ConfigError, match="STT_INFERENCE_THREADS was renamed STT_INFERENCE_LANES"):
        Settings.from_env({"STT_INFERENCE_THREADS": "2"})


@pytest.mark.parametrize("raw", ["²", "١", "0", "two"])
def test_a_worker_count_must_be_ascii_digits(raw: str) -> None:
    # "²" and "١" pass str.isdigit() but not int(): the message is still the setting's own.
    assert _config_error({"STT_WORKERS": raw}) == (
        f"STT_WORKERS must be a count of 1 or more, or auto, got {raw!r}")

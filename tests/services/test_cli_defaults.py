"""Each service's flags fall back to its config's own defaults: one source per default."""

import dataclasses

import pytest

from common.transfer.base import TRANSFER_TIMEOUT_SECONDS
from services.decode.jobs import DecodeLimits
from services.decode.main import build_parser as decode_parser
from services.frontend.app import FrontendConfig
from services.frontend.main import build_parser as frontend_parser
from services.prefill.main import build_parser as prefill_parser
from services.prefill.worker import DEFAULT_KV_LEASE_SECONDS, DEFAULT_MAX_NUM_WAITING


@pytest.fixture(autouse=True)
def no_tandem_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("TANDEM_"):
            monkeypatch.delenv(name)


def test_frontend_flags_default_to_frontend_config():
    args = frontend_parser().parse_args([])
    # model: resolved, not defaulted; api_server_index: an internal flag whose absence marks the parent process
    not_defaults = {"model", "api_server_index"}
    for field in dataclasses.fields(FrontendConfig):
        if field.default is not dataclasses.MISSING and hasattr(args, field.name) and field.name not in not_defaults:
            expected = getattr(field.default, "value", field.default)
            assert getattr(args, field.name) == expected, field.name


def test_decode_flags_default_to_decode_limits():
    args = decode_parser().parse_args([])
    limits = DecodeLimits()
    assert args.max_num_admitting == limits.max_num_admitting
    assert args.kv_admission_timeout_seconds == limits.admission_timeout_seconds
    assert args.max_kv_receiving_bytes == limits.max_receiving_bytes
    assert args.kv_transfer_timeout_seconds == TRANSFER_TIMEOUT_SECONDS


def test_prefill_flags_default_to_the_worker_defaults():
    args = prefill_parser().parse_args([])
    assert args.kv_lease_seconds == DEFAULT_KV_LEASE_SECONDS
    assert args.max_num_waiting == DEFAULT_MAX_NUM_WAITING


def test_environment_still_overrides_a_default(monkeypatch):
    monkeypatch.setenv("TANDEM_MAX_N", "3")
    monkeypatch.setenv("TANDEM_MAX_NUM_ADMITTING", "7")
    assert frontend_parser().parse_args([]).max_n == 3
    assert decode_parser().parse_args([]).max_num_admitting == 7

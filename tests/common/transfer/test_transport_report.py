"""The KV transport in the log: each one once, and a loud warning when GPU KV goes over TCP."""

import logging

import pytest

from common.transfer import ucx_runtime
from common.transfer.transport_report import forget_reported, is_tcp, report_transport

GPU_OVER_TCP_INFO = """\
#                 lane[0]: cm tcp
#                 lane[1]:  2:tcp/eth0.0 md[1]              -> md[1]/tcp/sysdev[255] rma_bw#0 am wireup
#
# +--------------------------+-----------------------------------------------------+
# | ucp_context_0 self cfg#4 | tagged message by ucp_tag_send* from cuda memory    |
# +--------------------------+--------------------------------------------+--------+
# |                        0 | eager short                                | tcp/eth0 |
# |                 8193..inf | (?) rendezvous pipeline cuda_copy, tcp    | cuda_copy/cuda, tcp/eth0 |
# +--------------------------+--------------------------------------------+--------+
#
"""


@pytest.fixture(autouse=True)
def unseen():
    forget_reported()
    yield
    forget_reported()


class FakeEndpoint:
    ucp_endpoint = 0


def test_tcp_is_recognised_among_the_transports_ucx_names():
    assert is_tcp("tcp") and is_tcp("cuda_copy+tcp")
    assert not is_tcp("rc_mlx5") and not is_tcp("cuda_ipc") and not is_tcp("unknown")


def test_gpu_kv_over_tcp_warns_once_and_other_transports_are_info(caplog):
    caplog.set_level(logging.INFO, logger="tandem.kv.transport")
    assert report_transport("cuda_copy+tcp", "cuda")
    assert not report_transport("cuda_copy+tcp", "cuda")  # once per process
    assert report_transport("tcp", "host")  # CPU workers: TCP is what is expected
    assert report_transport("rc_mlx5", "cuda")
    levels = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert len(levels) == 3
    assert levels[0][0] == "WARNING" and "KV between GPUs goes over TCP" in levels[0][1]
    assert levels[1] == ("INFO", "KV hand-offs of host memory use UCX transport tcp")
    assert levels[2] == ("INFO", "KV hand-offs of cuda memory use UCX transport rc_mlx5")


def test_the_first_endpoint_whose_gpu_kv_goes_over_tcp_is_reported(monkeypatch, caplog):
    monkeypatch.setattr(ucx_runtime, "_ucp_endpoint_info", lambda ucp_endpoint: GPU_OVER_TCP_INFO)
    caplog.set_level(logging.INFO, logger="tandem.kv.transport")
    first, second = FakeEndpoint(), FakeEndpoint()
    assert ucx_runtime.endpoint_transport(first, "cuda") == "cuda_copy+tcp"
    assert ucx_runtime.endpoint_transport(first, "cuda") == "cuda_copy+tcp"  # cached per endpoint
    assert ucx_runtime.endpoint_transport(second, "cuda") == "cuda_copy+tcp"  # a new peer, same transport
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and "UCX transport cuda_copy+tcp" in warnings[0].getMessage()

"""Shared fixtures: hypothesis profiles and the devices to test on."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from lorax_ref import available_devices

# "ci" is deterministic (derandomize) and bounded; "dev" explores more. Select with HYPOTHESIS_PROFILE.
settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=available_devices(), ids=lambda d: d.type)
def device(request) -> torch.device:
    """CPU always; CUDA too when present (GPU cases skip themselves on machines without one)."""
    return request.param


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (GPU cases are not collected)"
    return f"lorax_ref tests: torch {torch.__version__}, CUDA device: {cuda}"

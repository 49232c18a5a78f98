import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.manual_seed(0)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # tests run in several worker processes (pytest -n N, as `make test` does): one torch thread each, and one
    # for the processes they start, so that workers do not wait on each other's OpenMP barriers
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from device_lane import DEVICE_ENV, lane_spec, lane_summary, skip_reason  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"device: runs models on the device that {DEVICE_ENV} names (default: cpu); given to every test "
                   f"that takes the `device` fixture. `make test-gpu` runs these alone on cuda.")
    spec = lane_spec()
    try:
        torch.device(spec)
    except RuntimeError:
        raise pytest.UsageError(f"{DEVICE_ENV}={spec!r} is not a device torch knows: use cpu, cuda or cuda:N") \
            from None


def pytest_report_header(config):
    return lane_summary()


def pytest_collection_modifyitems(config, items):
    """Mark ``device`` the tests that take the ``device`` fixture (those that parametrise an argument of that name
    themselves, as tests/test_mixed_precision.py does, are not in the lane: they pick their own devices)."""
    for item in items:
        if "device" not in getattr(item, "fixturenames", ()):
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "device" in callspec.params:
            continue
        item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the model-running tests use: ``LRP_TEST_DEVICE`` (default ``cpu``). A device this machine does not
    have skips the test with the reason, so that a lane that cannot run says so instead of passing."""
    spec = lane_spec()
    reason = skip_reason(spec)
    if reason:
        pytest.skip(reason)
    return torch.device(spec)


# the Chromium tests' fixtures (tests/browser_support.py); a module may define its own `page` or `browser`
@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for the module (skipped, with the reason, without Playwright or Chromium)."""
    from browser_support import chromium
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser, server):
    """The app the module's ``server`` fixture serves, open and ready; fails on JavaScript errors."""
    from browser_support import open_page
    context, opened, errors = open_page(browser, server + "/")
    yield opened
    context.close()
    assert not errors, errors  # no JavaScript errors on the page


@pytest.fixture
def shoot(tmp_path):
    """Save a screenshot under tmp_path and, with LRP_SCREENSHOTS=dir, there too."""
    from browser_support import screenshot

    def save(opened, name: str):
        path = screenshot(opened, tmp_path, name)
        assert path.stat().st_size > 10_000
        return path
    return save

import pytest

import testsupport.fixtures


def pytest_configure(config: pytest.Config) -> None:
    # The repo's root conftest loads the fixtures plugin; load it here too so these
    # tests also run alone, without registering it (and its session servers) twice.
    if not config.pluginmanager.is_registered(testsupport.fixtures):
        config.pluginmanager.register(testsupport.fixtures, "testsupport.fixtures")

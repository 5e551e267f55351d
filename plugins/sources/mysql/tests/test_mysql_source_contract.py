"""The core's source contract, against a real MariaDB."""

from __future__ import annotations

import pytest
from dbevents.testing import SourceContract

from .conftest import MysqlEnv


class TestMysqlSourceContract(SourceContract):
    @pytest.fixture
    def source_env(self, mysql_env: MysqlEnv) -> MysqlEnv:
        # Sources made by the env start at the position the test database was made
        # at (the `start` option): MySQL keeps no per-reader state, so "no checkpoint
        # yet" means "from `start`", and re-reading unconfirmed changes works.
        return mysql_env

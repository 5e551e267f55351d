# Shared fixtures for every test in the repository: private database servers
# and a real webhook receiver (see testsupport/).
pytest_plugins = ["testsupport.fixtures"]

"""Real components for tests: private database servers and a scriptable webhook receiver.

Import from the submodules (``testsupport.servers``, ``testsupport.receiver``,
``testsupport.ports``) so a test needing one component never pays for the others'
client libraries.
"""

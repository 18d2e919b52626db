"""The backend registry: every backend, built-in or third-party, comes from the
`suite.backends` entry-point group declared in pyproject.toml.

SUITE_EXTRA_BACKENDS="name=module:Class,..." adds entries without packaging them
(used by the tests for deliberately failing backends, and handy while developing one).
"""

import os

from suite.errors import SuiteError
from suite.registry import Registry

BACKENDS: Registry = Registry("backend", group="suite.backends")

for item in filter(None, os.environ.get("SUITE_EXTRA_BACKENDS", "").split(",")):
    name, sep, target = item.partition("=")
    if not sep or ":" not in target:
        raise SuiteError(f"SUITE_EXTRA_BACKENDS entry '{item}' must look like name=module:Class")
    BACKENDS.register(name.strip(), target.strip())

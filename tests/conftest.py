# Imported here, at collection, and not left to hypothesis's pytest plugin, which imports it in
# its terminal summary when no test module did: pytest then rewrites (parses) hypothesis there,
# and CPython 3.11 before 3.11.8 can fail that parse with "SystemError: AST constructor
# recursion depth mismatch" (python/cpython#106905), turning a green run of one test file red.
import hypothesis  # noqa: F401

pytest_plugins = ["headrace.runtime.pytest_plugin"]

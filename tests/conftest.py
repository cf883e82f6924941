pytest_plugins = ["headrace.runtime.pytest_plugin"]

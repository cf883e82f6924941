pytest_plugins = ["runtime.pytest_plugin"]

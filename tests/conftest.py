"""hpcllm's own tests use the plugin it ships (registered by its entry point) and pytester."""

pytest_plugins = ["pytester"]

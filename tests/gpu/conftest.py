"""The serving fixtures (one Serve instance on a free port, deploy/undeploy), shared with the GPU tests."""

from tests.serving.conftest import deploy, serve_port  # noqa: F401 - fixtures, found by pytest by name

"""Python client library, CLI commands and load generator for fusionserve servers."""

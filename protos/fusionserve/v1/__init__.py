"""Generated gRPC stubs (protos/fusionserve/v1); regenerate with protos/generate.py."""

"""Generated gRPC stubs (protos/fusionserve/v2); regenerate with protos/generate.py."""

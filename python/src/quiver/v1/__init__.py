"""Generated gRPC stubs of quiver.v1 (written at build time from proto/)."""

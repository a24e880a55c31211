"""Generated protobuf modules (built from protos/ by `make proto`; not in git)."""

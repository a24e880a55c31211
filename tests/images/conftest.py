"""tests/images runs only under `make test-images` (VOICESTACK_TEST_IMAGES=1): it needs the
images `make images` builds and podman as root, and `make test` does not collect it."""

import os

if os.environ.get("VOICESTACK_TEST_IMAGES") != "1":
    collect_ignore_glob = ["test_*.py"]

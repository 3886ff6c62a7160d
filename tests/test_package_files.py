"""setup.py ships every source file the packages build at run time (the C++/CUDA extensions are compiled on first use
from the installed package's own directory, so a source missing from package_data breaks a non-editable install)."""
import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_keywords() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("packages", "package_data")}


def test_package_data_covers_every_extension_source():
    keywords = setup_keywords()
    missing = []
    for package in keywords["packages"]:
        patterns = keywords["package_data"].get(package, [])
        for source in sorted((ROOT / package).glob("*")):
            if source.suffix in (".cpp", ".cu", ".cuh", ".h") and not any(fnmatch.fnmatch(source.name, p)
                                                                          for p in patterns):
                missing.append(f"{package}/{source.name}")
    assert not missing, f"not in setup.py's package_data: {missing}"
    assert (ROOT / "qwen_model" / "cpu_decode_ops.cpp").exists()  # the check above saw at least this source

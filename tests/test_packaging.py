"""The top-level folders install as subpackages of `moescope`, in a wheel as in editable mode."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("moescope", "probe", "collector", "analysis", "dashboard", "kernels")


def test_wheel_holds_every_module_of_every_folder_under_the_moescope_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("moescope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder in FOLDERS:
        prefix = "moescope" if folder == "moescope" else f"moescope/{folder}"
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                expected.add(f"{prefix}/{rel.as_posix()}")
    assert expected and not expected - names
    assert "moescope/dashboard/assets/style.css" in names
    assert not any(n.startswith(("probe/", "kernels/", "collector/", "analysis/", "dashboard/")) for n in names)


def test_editable_install_imports_each_folder_from_this_checkout():
    import moescope.analysis
    import moescope.collector
    import moescope.dashboard
    import moescope.kernels
    import moescope.probe

    for module, folder in ((moescope.probe, "probe"), (moescope.kernels, "kernels"), (moescope.collector, "collector"),
                           (moescope.analysis, "analysis"), (moescope.dashboard, "dashboard")):
        assert Path(module.__file__).resolve().parent == ROOT / folder

"""Build hook: a wheel (or an sdist built into one) carries the compiled eBPF objects.

Metadata lives in pyproject.toml; this file only extends ``build_py``. Building a wheel runs
``make -C ebpf`` with clang and puts the objects in the package as ``director/bpf/*.o``, where
``director.dataplane.ebpf.object_dir()`` finds them once installed, with no source tree around.
An editable install (``pip install -e .``, the development setup) compiles nothing here: the code
then runs from the source tree and uses ``ebpf/build/``, which ``make -C ebpf`` keeps current.
"""

import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_bpf(build_py):
    def run(self) -> None:
        editable = getattr(self, "editable_mode", False)
        if not editable:
            # setuptools copies into build/lib and never deletes there: after a `git pull` that
            # removed a module, a reused build/ would still ship it. Start the package afresh.
            shutil.rmtree(Path(self.build_lib) / "director", ignore_errors=True)
        super().run()
        if editable:
            return
        out = (Path(self.build_lib) / "director" / "bpf").resolve()
        src = Path(__file__).resolve().parent / "ebpf"
        try:
            subprocess.run(["make", "-s", "-C", str(src), f"BUILD={out}"], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"vpn-director: compiling the eBPF objects failed ({e}); "
                             "the build needs make, clang and libbpf-dev") from None


setup(cmdclass={"build_py": build_py_with_bpf})

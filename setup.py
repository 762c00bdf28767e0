"""Build hook: a wheel (or an sdist built into one) carries the compiled eBPF objects.

Metadata lives in pyproject.toml; this file only extends ``build_py``. Building a wheel runs
``make -C ebpf`` with clang and puts the objects in the package as ``director/bpf/*.o``, where
``director.dataplane.ebpf.object_dir()`` finds them once installed, with no source tree around.
An editable install (``pip install -e .``, the development setup) compiles nothing here: the code
then runs from the source tree and uses ``ebpf/build/``, which ``make -C ebpf`` keeps current.
"""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_bpf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        out = (Path(self.build_lib) / "director" / "bpf").resolve()
        src = Path(__file__).resolve().parent / "ebpf"
        try:
            subprocess.run(["make", "-s", "-C", str(src), f"BUILD={out}"], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"vpn-director: compiling the eBPF objects failed ({e}); "
                             "the build needs make, clang and libbpf-dev") from None


setup(cmdclass={"build_py": build_py_with_bpf})

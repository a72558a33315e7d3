"""Does every requirement of the project resolve on the lent GPU machine? (``scripts/fetch_gpu_wheels.sh`` runs this.)

The machine has no network: what its image lacks must travel as wheels (``scripts/gpu_wheels.txt``, fetched into
``.whl/``). A requirement resolves when a fetched wheel or the image provides the package, in a matching version where
the version there is known. Checked: the project's ``install_requires`` and the extras in :data:`GPU_EXTRAS` (from
``setup.cfg``), and the requirements of every fetched wheel; also that each package is fetched once (two versions stop
the install there) and the total size.

Two ways to run it:

* ``python scripts/gpu_wheels.py DEST MAX_MIB``: the wheels in ``DEST`` (their own METADATA), after the download;
  when they pass, their requirements are recorded in ``scripts/gpu_wheels.requires.json`` (commit it);
* :func:`check_pins` (tests/test_gpu_wheels.py, offline): the pinned list with the recorded requirements, so a new
  dependency in ``setup.cfg`` that is neither pinned nor in the image, or a pin changed without fetching it, fails the
  test suite, not the first GPU session.
"""

from __future__ import annotations

import configparser
import json
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Optional

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "scripts" / "gpu_wheels.txt"
REQUIRES = REPO / "scripts" / "gpu_wheels.requires.json"
"""Each pinned wheel's version and ``Requires-Dist`` lines, as the last successful fetch read them."""

GPU_EXTRAS = ("gpu", "report")
"""setup.cfg extras that must work on the GPU machine: Liger kernels for gpu_check.py, and ``--html`` reports (both
cheap there: liger-kernel is one small wheel, matplotlib is in the image). ``serve`` (LitServe, FastAPI, uvicorn and
their needs) is not needed to measure anything and stays out."""

# The GPU image's Python packages (/work/.library/device/KINDS.md, read 2026-11-17) and the versions seen there (2026-11).
DEVICE = set(map(canonicalize_name, """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()))
DEVICE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "lightning": "2.6.6", "numpy": "2.5.2",
                   "pytorch-lightning": "2.6.6", "safetensors": "0.8.0", "tokenizers": "0.23.2", "torch": "2.11.0",
                   "torchmetrics": "1.9.0", "transformers": "5.17.0", "triton": "3.6.0"}  # fmt: skip
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "platform_release": "", "platform_version": "",
       "implementation_version": "3.12.3"}  # fmt: skip
EXTRAS = {"jsonargparse": ["signatures"]}  # extras the project installs (setup.cfg: jsonargparse[signatures])

Fetched = dict[str, tuple[str, Optional[list[str]]]]
"""Package name → (version, its ``Requires-Dist`` lines, or None where they are not known offline)."""


def pins(path: Path = PINS) -> dict[str, str]:
    """``name → version`` of the pinned wheels (``name==version`` words; ``#`` starts a comment)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        for word in line.split("#")[0].split():
            name, version = word.split("==")
            out[canonicalize_name(name)] = version
    return out


def project_requirements(setup_cfg: Path = REPO / "setup.cfg", extras: Iterable[str] = GPU_EXTRAS) -> list[str]:
    """``install_requires`` and the given extras of ``setup.cfg``, one requirement string each."""
    setup = configparser.ConfigParser()
    setup.read(setup_cfg, encoding="utf-8")
    lines = setup["options"]["install_requires"].split("\n")
    for extra in extras:
        lines += setup["options.extras_require"][extra].split("\n")
    return [line for line in (ln.split("#")[0].strip() for ln in lines) if line]


def _applies(req: Requirement, extras: list[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate(dict(ENV, extra=e)) for e in ["", *extras])


def problems(fetched: Fetched, project: list[str]) -> list[str]:
    """What would not resolve on the GPU machine: one line per unmet requirement (empty when all resolve)."""
    found = []

    def check(req: Requirement, needed_by: str) -> None:
        name = canonicalize_name(req.name)
        version = fetched[name][0] if name in fetched else DEVICE_VERSIONS.get(name)
        if name not in fetched and name not in DEVICE:
            found.append(f"{needed_by} needs {req}: neither fetched nor on the GPU machine")
        elif version is not None and not req.specifier.contains(version, prereleases=True):
            where = "fetched" if name in fetched else "on the GPU machine"
            found.append(f"{needed_by} needs {req}, but {name} {version} is {where}")

    for name, (version, requires) in fetched.items():
        for line in requires or []:
            req = Requirement(line)
            if _applies(req, EXTRAS.get(name, [])):
                check(req, f"{name} {version}")
    for line in project:
        check(Requirement(line), "healthai")
    return found


def check_pins(path: Path = PINS, requires: Path = REQUIRES) -> list[str]:
    """Offline: what would not resolve for the pinned list, with each pin's requirements as recorded by the last
    fetch; a pin the record lacks (added or changed since) is a problem too."""
    recorded = json.loads(requires.read_text(encoding="utf-8"))
    found, fetched = [], {}
    for name, version in pins(path).items():
        if recorded.get(name, {}).get("version") != version:
            found.append(f"{requires.name} does not record {name}=={version}: run bash scripts/fetch_gpu_wheels.sh "
                         "(with PyPI access) and commit it")  # fmt: skip
        fetched[name] = (version, recorded.get(name, {}).get("requires"))
    return found + problems(fetched, project_requirements())


def check_wheels(dest: Path, max_mib: float) -> int:
    """The download-time check of the wheels in ``dest``; prints them and any problem, returns the exit status."""
    found = []
    fetched: Fetched = {}
    files: dict[str, Path] = {}
    for whl in sorted(dest.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        name = canonicalize_name(name)
        if name in fetched:
            found.append(f"two wheels of {name}: {files[name].name} and {whl.name}")
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode("utf-8").splitlines()
        fetched[name] = (version, [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:")])
        files[name] = whl
    found += problems(fetched, project_requirements())

    total = sum(whl.stat().st_size for whl in files.values()) / 2**20
    print(f"{len(fetched)} wheels in {dest}/, {total:.1f} MiB (limit {max_mib:g} MiB):")
    for name, whl in sorted(files.items()):
        print(f"  {name} {fetched[name][0]}  ({whl.stat().st_size / 2**20:.1f} MiB)")
    if total > max_mib:
        found.append(f"{total:.1f} MiB of wheels, over {max_mib:g} MiB")
    for p in found:
        print(f"fetch_gpu_wheels.sh: {p}", file=sys.stderr)
    if found:
        return 1
    print("every requirement resolves on the GPU machine (Python 3.12, x86_64)")
    record = {name: {"version": version, "requires": requires} for name, (version, requires) in sorted(fetched.items())}
    REQUIRES.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"recorded their requirements in {REQUIRES.relative_to(REPO)} (the test suite checks the pins with it)")
    return 0


if __name__ == "__main__":
    sys.exit(check_wheels(Path(sys.argv[1]), float(sys.argv[2])))

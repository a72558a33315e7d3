"""Keep known third-party noise out of a command's output. ``--verbose`` or ``HEALTHAI_DEBUG=1`` lets all of it
through again.

A command prints its own lines, its progress bars and real warnings. Each entry below silences one known message where
it is emitted: the logger that emits it (a filter on that logger for that message), or a warnings filter on the
message's text, category and the module it is attributed to. Everything else those libraries say still shows. Each
entry names the versions that emit it (setup.cfg's bounds). A release that drops the message leaves its entry
matching nothing; a release that rewords it lets it through again, which is the safe way to fail.

:func:`install` is called by :func:`healthai.__main__.main` before a command imports any of these libraries.
Importing this module imports none of them.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

VERBOSE_FLAG = "--verbose"
"""``python -m healthai COMMAND --verbose ...``: this module installs nothing, so third-party noise is printed."""

VERBOSE_ENV_VAR = "HEALTHAI_VERBOSE"
"""Set to 1 to do what ``--verbose`` does. ``--verbose`` sets it, so that processes a command starts (Lightning's DDP
ranks rerun the command line, which no longer has the flag) are verbose too."""

DEBUG_ENV_VAR = "HEALTHAI_DEBUG"
"""The entry point's traceback switch (:mod:`healthai.__main__`). It is verbose too: a traceback is read best next to
everything the libraries said."""

BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}
"""Values a jsonargparse ``bool`` option takes. ``validate --verbose true`` is Lightning's own ``verbose`` (print the
results table), not this module's flag."""


@dataclass(frozen=True)
class LogNoise:
    """One message that a library logs: dropped from ``logger`` when its text starts with ``pattern`` (a regex)."""

    logger: str
    pattern: str


@dataclass(frozen=True)
class WarningNoise:
    """One warning: ignored when its text starts with ``message`` (a regex), its category is ``category`` and the code
    that raised it is in a module matching ``module``."""

    message: str
    category: type[Warning]
    module: str


LOG_NOISE: tuple[LogNoise, ...] = (
    # bitsandbytes 0.50 (its CPU backend, on CPUs with AVX512-BF16) asks the `kernels` package (0.19) for a faster 4-bit
    # matmul from the Hugging Face Hub when it is imported. That happens on every model load, because peft imports
    # it. kernels refuses a kernel whose publisher it cannot verify (offline, or not trusted) unless trust_remote_code
    # is passed, and nothing passes it. bitsandbytes logs this and uses its own CPU kernel: 4-bit (QLoRA) on a CPU
    # still works, only without that optional kernel. GPUs never take this path.
    LogNoise("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    # Lightning 2.6 advertises its cloud products (LitLogger, LitModels) at every Trainer start, through its
    # rank-zero info logger: "💡 Tip: ... try installing [litlogger] ..." and "... [litmodels] ...". The other lines
    # of that logger (devices found, checkpoints, the adapter saved) still show.
    LogNoise("lightning.pytorch.utilities.rank_zero", r"💡 Tip: .*\[(litlogger|litmodels)\]"),
    # export writes "temperature": 0.0 with do_sample false into the merged folder's generation_config.json: that is
    # how vLLM reads greedy decoding (GenerationSettings.serving_config). transformers 5 calls a temperature without
    # sampling "not valid" when export reloads the folder for its parity check. Only that one flag is dropped, so
    # other flags it objects to still show.
    LogNoise("transformers.generation.configuration_utils",
             r"The following generation flags are not valid and may be ignored: \['temperature'\]\."),  # fmt: skip
)

WARNING_NOISE: tuple[WarningNoise, ...] = (
    # transformers 5 renamed PreTrainedModel.is_gradient_checkpointing to is_activation_checkpointing. The old name
    # warns (modeling_utils.py). peft 0.21's PeftModel.__init__ still reads it for every LoRA built or applied. Not
    # healthai's code, and not fixable here.
    WarningNoise(r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils\Z"),
    # torch 2.13 deprecates the LeafSpec class. Lightning 2.6's own copy of tree_flatten
    # (lightning/pytorch/utilities/_pytree.py, used by its CombinedLoader for every dataloader) still builds one.
    WarningNoise(r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
                 r"lightning\.pytorch\.utilities\._pytree\Z"),  # fmt: skip
)


class DropMessages(logging.Filter):
    """A logger filter that drops the records whose message starts with ``pattern``."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def install() -> None:
    """Silence every entry of :data:`LOG_NOISE` and :data:`WARNING_NOISE`. Safe to call more than once: a logger
    gets each filter once, and a warnings filter added again replaces its earlier copy. A logger filter stays for
    the whole process. The warnings filters are process-wide too, but pytest restores its own after each test."""
    for noise in LOG_NOISE:
        logger = logging.getLogger(noise.logger)  # the same object the library gets when it is imported later
        if not any(isinstance(f, DropMessages) and f.pattern.pattern == noise.pattern for f in logger.filters):
            logger.addFilter(DropMessages(noise.pattern))
    for noise in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=noise.message, category=noise.category, module=noise.module)


def take_verbose_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without its bare ``--verbose`` flags, and whether it had one. A ``--verbose`` followed by a boolean
    value, or written ``--verbose=...``, is left in place: it is Lightning's option of ``validate`` (see
    :data:`BOOLEAN_WORDS`)."""
    rest, verbose = [], False
    for i, arg in enumerate(argv):
        value_follows = i + 1 < len(argv) and argv[i + 1].lower() in BOOLEAN_WORDS
        if arg == VERBOSE_FLAG and not value_follows:
            verbose = True
        else:
            rest.append(arg)
    return rest, verbose


def verbose_from_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``HEALTHAI_VERBOSE`` or ``HEALTHAI_DEBUG`` asks for everything (set, and not ``0``)."""
    return any(environ.get(name, "") not in ("", "0") for name in (VERBOSE_ENV_VAR, DEBUG_ENV_VAR))


def install_unless_verbose() -> bool:
    """:func:`install`, unless the environment asks for everything (:func:`verbose_from_environment`); returns
    whether it installed. Also for a process that a command starts without going through the entry point (a
    multiprocessing "spawn" child runs no ``main()``): that process inherits the environment, so ``--verbose``
    reaches it too."""
    if verbose_from_environment():
        return False
    install()
    return True

"""The llama.cpp self-check: every quant decodes on this machine, each in a child process.

A llama.cpp build with an instruction this CPU lacks dies with SIGILL in the
first matrix multiply of a quantized model, so the check quantizes a tiny
random model of the real architecture (made by :mod:`ocrbatch.dev.model`, cached)
to each GGUF type and runs :meth:`LanguageModel.warm_up` on it in a child
process: a child that dies names the signal, and the parent lives to say so.
``scripts/install.sh`` runs it through ``ocrbatch doctor`` and fails the
install when any quant fails.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..model.gguf import QUANTS, cache_dir

CHILD_TIMEOUT_S = 300


@dataclass(frozen=True)
class QuantCheck:
    quant: str
    ok: bool
    detail: str  # what happened: the child's time, its error or the signal that killed it
    seconds: float


def self_check_model(cache: str | Path | None = None) -> Path:
    """The tiny model the check quantizes, made once per cache folder."""
    from ..dev.model import make_model

    folder = cache_dir(cache) / "selfcheck" / "tiny-model"
    if not (folder / "config.json").is_file():
        scratch = folder.with_name(f".{folder.name}.partial")
        make_model(scratch, size="tiny", seed=0)
        scratch.replace(folder)
    return folder


def child_command(quant: str, model: Path, cache: str | Path | None) -> list[str]:
    """The child that converts ``model`` to ``quant`` and decodes with it."""
    command = [sys.executable, "-m", "ocrbatch.machine.selfcheck", quant, str(model)]
    return command + (["--cache-dir", str(cache)] if cache else [])


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (an instruction this CPU does not have)" if -returncode == signal.SIGILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {returncode}"


def check_quants(quants: Sequence[str] = QUANTS, cache: str | Path | None = None,
                 command=child_command) -> list[QuantCheck]:
    """Run the decode child for each quant. ``command(quant, model, cache)`` builds the child's
    command line (tests pass one that crashes)."""
    model = self_check_model(cache)
    results = []
    for quant in quants:
        started = time.monotonic()
        try:
            child = subprocess.run(command(quant, model, cache), capture_output=True, text=True,
                                   timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            results.append(QuantCheck(quant, False, f"no answer within {CHILD_TIMEOUT_S} s",
                                      time.monotonic() - started))
            continue
        seconds = time.monotonic() - started
        if child.returncode == 0:
            results.append(QuantCheck(quant, True, f"decoded in {seconds:.1f} s", seconds))
        else:
            said = (child.stderr.strip().splitlines() or [""])[-1]
            results.append(QuantCheck(quant, False, describe_exit(child.returncode) + (f": {said}" if said else ""),
                                      seconds))
    return results


def _child(argv: list[str]) -> int:
    import argparse

    from ..model.gguf import convert
    from ..model.language import LanguageModel
    from .llama_runtime import best_cpu_module, system_info

    parser = argparse.ArgumentParser(prog="python -m ocrbatch.machine.selfcheck")
    parser.add_argument("quant")
    parser.add_argument("model")
    parser.add_argument("--cache-dir")
    args = parser.parse_args(argv)
    gguf = convert(args.model, args.quant, cache=args.cache_dir)
    with LanguageModel(gguf, n_ctx=256) as model:
        model.warm_up()
    module = best_cpu_module()
    print(f"{args.quant} decoded with {module.name if module else 'the linked-in CPU backend'}: {system_info()}")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))

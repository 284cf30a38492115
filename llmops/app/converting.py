"""Convert, then verify the staged output in its own runtime, then hand it out.

The converters write and describe; the benchmarks measure; only here are the two joined
(``convert --verify``). The output stays under its temporary name until verification has
passed: an artifact that fails is removed, and an earlier output at the same destination
is left as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops.converters.base import ArtifactRecord, TargetSpec
from llmops.core.progress import as_reporter

VERIFY_CHUNKS = 4


def convert(
    source: str | Path,
    target: str | TargetSpec,
    output: str | Path | None = None,
    *,
    verify: bool = True,
    eval_text: str | None = None,
    allow_nonfinite: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ArtifactRecord:
    """Convert a checkpoint to ``target`` (see ``llmops.converters.api.convert``) and, with
    ``verify``, compare it with the source on ``eval_text`` (default: wikitext-2 via
    ``llmops.core.evaltext``), 4 chunks of 512 tokens, by the same evaluation ``llmops bench``
    uses: KL-divergence, top-1 agreement and both perplexities. ``progress``: a plain callable or
    a reporter (``llmops.core.progress``): conversion and verification are its phases."""
    from llmops.converters import api

    say = as_reporter(progress)
    if verify and eval_text is None:
        from llmops.core.evaltext import load_eval_text

        eval_text = load_eval_text(progress=say).text
    record = api.convert(source, target, output, commit=not verify, allow_nonfinite=allow_nonfinite,
                         threads=threads, device=device, options=options, progress=say)
    if not verify:
        return record
    try:
        verify_record(record, source, eval_text or "", threads=threads, device=device, progress=say)
        record.commit()
    except BaseException:
        # An artifact that could not be verified is not handed out: the user can convert
        # again with --no-verify to keep it unchecked.
        record.discard()
        raise
    return record


def verify_record(record: ArtifactRecord, source: str | Path, eval_text: str, *, threads: int | None,
                  device: str, progress: Callable[[str], None]) -> None:
    """Run the (staged) artifact against its source; the figures go into the record."""
    from llmops.benchmarks.accuracy import evaluate

    res = evaluate(record.output, eval_text, source=source, chunks=VERIFY_CHUNKS,
                   threads=threads or os.cpu_count(), device=device, progress=progress, phase="verify")
    record.verification = {k: res[k] for k in ("kld", "top1_agreement", "ppl_source", "ppl_output")}
    record.parameters["verification"] = {"chunks": res["chunks"], "n_ctx": res["n_ctx"],
                                         "tokens": res["tokens"], "kld_p99": res["kld_p99"]}

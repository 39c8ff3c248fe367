"""Incremental data stages: a retrain after 1% new files vs a full rebuild of the same files.

On the demo corpus (``data.sources=[stdlib]``, conf/default.yaml's cleaning, dedup and BPE settings):

1. a full ingest + clean + tokenize (the first run; it also warms up imports, so neither timing
   below pays them);
2. ~1% new files: every 100th stdlib file copied, with changed content, into a temporary folder that
   becomes a second source (``data.sources=[stdlib, <folder>]``);
3. the retrain's ingest + clean + tokenize in the same work folder, keeping the first run's
   tokenizer as a retrain that warm-starts from the champion does (here ``tokenizer.kind=file``
   naming the first run's tokenizer.json, the same bytes): they extend the first run's outputs
   (only the new files are read, only their documents cleaned and encoded);
4. a full rebuild of the same sources, with the same tokenizer, in an empty work folder;
5. every output file of 3 and 4 compared byte for byte (stats.json aside: it holds timings).

The stages run through their rows of the stage table (``lm.stages``), as the pipeline runs them.
A retrain from scratch trains a new tokenizer on the new training split, and then encodes every
document again: its tokenize is not incremental (the first run's tokenize time is that cost). The
last line holds the figures as key=value: ``speedup`` is full rebuild time / retrain time over the
three data stages (goal >= 10), ``ingest_clean_speedup`` the same without tokenize, and ``equal``
says whether the outputs are the same.

    .venv/bin/python benchmarks/incremental.py            # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COMPARED = {
    "ingest": ("provenance.csv", "doc_digests.npy", "ingest_index.json"),  # and every part of documents/
    "clean": ("train.parquet", "val.parquet", "duplicates.parquet", "dedup_index.parquet", "dedup_signatures.u32",
              "dedup_samples.jsonl", "dropped_samples.jsonl", "length_hist.png", "dropped_by_reason.png"),
    "tokenize": ("tokenizer.json", "tokenizer_config.json", "index.json", "train_docs.npy", "val_docs.npy"),
}
TIMED = ("ingest", "clean", "tokenize")


def run_data(cfg) -> dict[str, tuple[Path, object, float]]:
    """ingest, clean, base_model (nothing to bring here) and tokenize through their stage rows;
    (folder, result, seconds) per stage."""
    from lm.pipeline.stage import StageContext, execute, stage_by_name
    from lm.pipeline.workspace import stage_dirs
    from lm.stages import STAGES

    stages = [stage_by_name(STAGES, name) for name in ("ingest", "clean", "base_model", "tokenize")]
    dirs = stage_dirs(cfg, stages)
    out = {}
    for stage in stages:
        t0 = time.perf_counter()
        result = execute(stage, StageContext(cfg, {name: dirs[name] for name in stage.inputs}, dirs[stage.name]))
        out[stage.name] = (dirs[stage.name], result, time.perf_counter() - t0)
    return out


def seconds(run: dict, stages: tuple[str, ...] = TIMED) -> float:
    return sum(run[name][2] for name in stages)


def shard_files(folder: Path) -> list[str]:
    from lm.text.shards import TokenIndex

    index = TokenIndex.load(folder)
    return [name for split in index.splits.values() for name in split["files"]]


def new_files(dest: Path, every: int) -> list[Path]:
    """Every ``every``-th stdlib source file, copied with changed content (a line added at the top)."""
    from lm.data.sources import stdlib_sources

    dest.mkdir(parents=True)
    made = []
    for i, sf in enumerate(stdlib_sources(include_tests=True)[::every]):
        if sf.path.suffix != ".py":
            continue
        target = dest / f"{i:04d}_{sf.path.name}"
        target.write_text(f"# retrain benchmark: changed copy {i} of {sf.name}\n" + sf.path.read_text(errors="replace"))
        made.append(target)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "default.yaml"))
    parser.add_argument("--every", type=int, default=100, help="copy every N-th stdlib file (100: 1%%)")
    args = parser.parse_args()

    from lm.config import load_config

    with tempfile.TemporaryDirectory(prefix="lmforge-incremental-") as tmp:
        tmp = Path(tmp)
        base = ["data.sources=[stdlib]"]
        first = run_data(load_config(args.config, [f"workdir={tmp / 'runs'}", *base]))
        files = first["ingest"][1].metrics["ingest/files"]
        print(f"first run (full, warms up): ingest {first['ingest'][2]:.2f} s, clean {first['clean'][2]:.2f} s, "
              f"tokenize {first['tokenize'][2]:.2f} s (trains the BPE tokenizer, encodes every document), "
              f"{files:.0f} files, {first['ingest'][1].metrics['ingest/documents']:.0f} documents, "
              f"{first['ingest'][1].metrics['ingest/bytes'] / 2**20:.1f} MB")

        added = new_files(tmp / "new", args.every)
        # The first run's tokenizer, kept: what a warm start from the champion does.
        kept = tmp / "kept_tokenizer.json"
        shutil.copy(first["tokenize"][0] / "tokenizer.json", kept)
        union = [f"data.sources=[stdlib,{tmp / 'new'}]", "tokenizer.kind=file", f"tokenizer.path={kept}"]
        print(f"new data: {len(added)} changed copies of stdlib files ({len(added) / files:.1%} of the files), "
              f"{sum(p.stat().st_size for p in added) / 2**10:.0f} KB")

        retrain = run_data(load_config(args.config, [f"workdir={tmp / 'runs'}", *union]))
        full = run_data(load_config(args.config, [f"workdir={tmp / 'full'}", *union]))
        inc_s, full_s = seconds(retrain), seconds(full)
        inc_ic, full_ic = seconds(retrain, ("ingest", "clean")), seconds(full, ("ingest", "clean"))
        ri, rc, rt = (retrain[name][1].metrics for name in TIMED)
        print(f"retrain (incremental): ingest {retrain['ingest'][2]:.2f} s (read {ri['ingest/files_read']:.0f} files, "
              f"reused {ri['ingest/files_reused']:.0f}), clean {retrain['clean'][2]:.2f} s (new documents "
              f"{rc['clean/docs_new']:.0f}, reused {rc['clean/docs_reused']:.0f}), tokenize {retrain['tokenize'][2]:.2f} s "
              f"(encoded {rt['tokenize/docs_encoded']:.0f} documents, copied {rt['tokenize/docs_reused']:.0f}), "
              f"total {inc_s:.2f} s")
        print(f"full rebuild of the same sources: ingest {full['ingest'][2]:.2f} s, clean {full['clean'][2]:.2f} s, "
              f"tokenize {full['tokenize'][2]:.2f} s, total {full_s:.2f} s")

        extra = {"ingest": sorted(f"documents/{p.name}" for p in (full["ingest"][0] / "documents").iterdir()),
                 "tokenize": shard_files(full["tokenize"][0])}
        different = [f"{stage}/{name}" for stage, names in COMPARED.items() for name in (*names, *extra.get(stage, ()))
                     if (retrain[stage][0] / name).read_bytes() != (full[stage][0] / name).read_bytes()]
        equal = not different and all(
            retrain["clean"][1].metrics[k] == full["clean"][1].metrics[k]
            for k in full["clean"][1].metrics if not k.endswith(("seconds", "mb_per_s", "docs_new", "docs_reused"))
        )
        print(f"outputs byte-identical to the full rebuild: {equal}" + (f" (differ: {', '.join(different)})" if different else ""))
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"full_s={full_s:.3f} incremental_s={inc_s:.3f} speedup={full_s / inc_s:.1f} "
          f"ingest_clean_speedup={full_ic / inc_ic:.1f} ingest_speedup={full['ingest'][2] / retrain['ingest'][2]:.1f} "
          f"clean_speedup={full['clean'][2] / retrain['clean'][2]:.1f} "
          f"tokenize_speedup={full['tokenize'][2] / retrain['tokenize'][2]:.1f} "
          f"new_files={len(added)} files_read={ri['ingest/files_read']:.0f} docs_new={rc['clean/docs_new']:.0f} "
          f"docs_encoded={rt['tokenize/docs_encoded']:.0f} equal={'true' if equal else 'false'}")


if __name__ == "__main__":
    main()

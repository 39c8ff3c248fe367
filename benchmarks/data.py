"""Data-stage benchmark on a real corpus: the text files of the installed site-packages.

Three figures, in one run:

1. clean + exact + near dedup throughput (input MB/s) of ``lm.data.clean.clean`` against
   datatrove configured with the same rules: Gopher quality (mean word length 3..10, symbol ratio
   0.1, non-alphabetic words 0.8), Gopher repetition (duplicate lines 0.3, top 2/3/4-grams
   0.20/0.18/0.16), e-mail/IP redaction, exact dedup on case/whitespace-normalised text, and MinHash
   with 5-word shingles, the same bands x rows, threshold 0.8. Both read the same documents from
   parquet and use the same number of processes. datatrove's English word tokenizer needs spaCy;
   both sides split words on whitespace instead (the rules are defined on words either way).
2. tokenization throughput (tokens/s) of the tokenize stage (read parquet, encode, write uint16
   shards) against ``tokenizers``' own ``encode_batch`` on the same texts already in memory.
3. peak memory (PSS and RSS of the process and its workers) of ingest -> clean -> tokenize at two
   input sizes.

The last line of output is one line of key=value figures. Run (6 minutes on 2 idle cores):

    .venv/bin/python benchmarks/data.py                       # 200 MB; memory at 50 and 500 MB
    .venv/bin/python benchmarks/data.py --max-mb 20 --rss-mb 10,40 --workers 2   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CORPUS_EXT = (".py", ".md")
EXTRA_EXT = (".pyi", ".h", ".hpp", ".c", ".cpp", ".cu", ".js", ".txt", ".rst", ".pyx", ".css", ".json")
BANDS_ROWS_NOTE = "bands x rows from lm.data.dedup.lsh_params(0.8, 128)"


def corpus_files(max_mb: float, extensions: tuple[str, ...]) -> list[Path]:
    """Sorted text files of site-packages (then the stdlib) up to ``max_mb`` megabytes."""
    roots = [Path(p) for p in site.getsitepackages()] + [Path(sysconfig.get_paths()["stdlib"])]
    files, total, budget = [], 0, max_mb * 2**20
    seen = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d != "__pycache__" and not (root.name.startswith("python3") and d == "site-packages")
            )
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if not name.endswith(extensions) or p.is_symlink() or p.resolve() in seen:
                    continue
                seen.add(p.resolve())
                files.append(p)
                total += p.stat().st_size
                if total >= budget:
                    return files
    return files


def link_corpus(files: list[Path], dest: Path) -> None:
    """A directory of symlinks: the ingest stage reads it like any source directory."""
    dest.mkdir(parents=True)
    for i, f in enumerate(files):
        (dest / f"{i:06d}_{f.name}").symlink_to(f)


def data_config(workers: int, preset: str = "prose", **kw):
    from lm.config import CleanConfig, DataConfig, DedupConfig

    # Prose preset = Gopher rules, the set datatrove also implements.
    return DataConfig(
        workers=workers,
        clean=CleanConfig(preset=preset, min_chars=1, max_chars=10**9),
        dedup=DedupConfig(shingle_size=5, num_perm=128, threshold=0.8),
        **kw,
    )


def run_lmforge_clean(documents: Path, out: Path, workers: int) -> tuple[float, dict]:
    from lm.data.clean import clean

    out.mkdir(parents=True)
    t = time.perf_counter()
    result = clean(data_config(workers), documents, out_dir=out)
    return time.perf_counter() - t, result.metrics


def split_for_datatrove(documents: Path, dest: Path, files: int) -> None:
    """datatrove parallelises over input files: give it ``files`` parquet files of the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest.mkdir(parents=True)
    from lm.data.ingest import Documents

    docs = Documents(documents)
    groups = list(range(docs.num_row_groups))
    per = max(1, -(-len(groups) // files))
    for i in range(0, len(groups), per):
        table = pa.concat_tables([docs.read_row_group(g) for g in groups[i : i + per]])
        pq.write_table(table, dest / f"{i // per:05d}.parquet")


def run_datatrove(input_dir: Path, work: Path, workers: int, bands: int, rows: int) -> tuple[float, dict]:
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return text.split("\n")

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            spans, at = [], 0
            for line in text.split("\n"):
                spans.append((at, at + len(line)))
                at += len(line) + 1
            return spans

    def normalised(doc: Document) -> bytes:  # bytes: datatrove hashes them as they are
        return " ".join(doc.text.lower().split()).encode("utf-8", errors="surrogatepass")

    words = Whitespace("en")
    tasks = len(list(input_dir.glob("*.parquet")))
    exact_cfg = ExactDedupConfig(content_getter=normalised)
    mh_cfg = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows)
    d = {
        k: work / k
        for k in (
            "filtered",
            "exact_sig",
            "exact_dups",
            "exact",
            "mh_sig",
            "mh_buckets",
            "mh_clusters",
            "final",
            "logs",
        )
    }

    def reader(folder: Path) -> ParquetReader:
        return ParquetReader(str(folder), text_key="text", id_key="doc_id", glob_pattern="*.parquet")

    def execute(pipeline: list, n_tasks: int, name: str) -> None:
        LocalPipelineExecutor(
            pipeline=pipeline,
            tasks=n_tasks,
            workers=min(workers, n_tasks),
            logging_dir=str(d["logs"] / name),
            skip_completed=False,
        ).run()

    t = time.perf_counter()
    execute(
        [
            reader(input_dir),
            GopherQualityFilter(
                min_doc_words=1,  # no words: dropped (as lmforge does); None divides by zero
                max_doc_words=None,
                min_avg_word_length=3,
                max_avg_word_length=10,
                max_symbol_word_ratio=0.1,
                max_bullet_lines_ratio=None,
                max_ellipsis_lines_ratio=None,
                max_non_alpha_words_ratio=0.8,
                min_stop_words=None,
                language=words,
            ),
            GopherRepetitionFilter(
                dup_line_frac=0.3,
                dup_para_frac=None,
                dup_line_char_frac=None,
                dup_para_char_frac=None,
                top_n_grams=((2, 0.2), (3, 0.18), (4, 0.16)),
                dup_n_grams=(),
                language=words,
            ),
            PIIFormatter(remove_emails=True, remove_ips=True, only_remove_public_ips=False),
            ParquetWriter(str(d["filtered"])),
        ],
        tasks,
        "1_filter",
    )
    execute(
        [reader(d["filtered"]), ExactDedupSignature(str(d["exact_sig"]), config=exact_cfg)],
        tasks,
        "2_exact_sig",
    )
    execute([ExactFindDedups(str(d["exact_sig"]), str(d["exact_dups"]), config=exact_cfg)], 1, "3_exact_find")
    execute(
        [
            reader(d["filtered"]),
            ExactDedupFilter(str(d["exact_dups"]), config=exact_cfg),
            ParquetWriter(str(d["exact"])),
        ],
        tasks,
        "4_exact_filter",
    )
    execute(
        [reader(d["exact"]), MinhashDedupSignature(str(d["mh_sig"]), config=mh_cfg, language=words)],
        tasks,
        "5_mh_sig",
    )
    execute(
        [MinhashDedupBuckets(str(d["mh_sig"]), str(d["mh_buckets"]), config=mh_cfg)], bands, "6_mh_buckets"
    )
    execute(
        [MinhashDedupCluster(str(d["mh_buckets"]), str(d["mh_clusters"]), config=mh_cfg)], 1, "7_mh_cluster"
    )
    execute(
        [reader(d["exact"]), MinhashDedupFilter(str(d["mh_clusters"])), ParquetWriter(str(d["final"]))],
        tasks,
        "8_mh_filter",
    )
    seconds = time.perf_counter() - t

    import pyarrow.parquet as pq

    def rows_in(folder: Path) -> int:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.rglob("*.parquet"))

    return seconds, {
        "filtered": rows_in(d["filtered"]),
        "exact": rows_in(d["exact"]),
        "final": rows_in(d["final"]),
    }


def bench_tokenize(clean_dir: Path, work: Path, vocab_size: int) -> dict:
    """Train once, then time the tokenize stage (kind=file) against encode_batch on the same texts."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from lm.config import Config, TokenizerConfig
    from lm.text.tokenize_stage import tokenize

    trained = work / "trained"
    trained.mkdir(parents=True)
    t = time.perf_counter()
    tokenize(Config(tokenizer=TokenizerConfig(kind="bpe", vocab_size=vocab_size)), clean_dir, out_dir=trained)
    train_s = time.perf_counter() - t
    ours = work / "ours"
    ours.mkdir()
    cfg = Config(tokenizer=TokenizerConfig(kind="file", path=str(trained / "tokenizer.json")))
    # The whole stage (reading the splits, encoding, writing shards), as tokens_per_s measured it
    # before it counted the tokenizer's own time only.
    t = time.perf_counter()
    result = tokenize(cfg, clean_dir, out_dir=ours)
    ours_tps = (result.metrics["tokenize/train_tokens"] + result.metrics["tokenize/val_tokens"]) / (time.perf_counter() - t)

    tok = Tokenizer.from_file(str(trained / "tokenizer.json"))
    texts = []
    for split in ("train", "val"):
        texts += pq.read_table(clean_dir / f"{split}.parquet", columns=["text"]).column(0).to_pylist()
    best = 0.0
    for batch in (512, 4096):  # the baseline gets its better batch size
        t = time.perf_counter()
        n = 0
        for i in range(0, len(texts), batch):
            n += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + batch], add_special_tokens=False))
        best = max(best, n / (time.perf_counter() - t))
    return {"train_s": train_s, "ours_tps": ours_tps, "hf_tps": best, "tokens": n}


def rss_child(corpus: Path, work: Path, workers: int) -> None:
    """Ingest -> clean -> tokenize of the ``corpus`` folder, sampling the RSS of this process and its
    workers. (The parent lists and links the corpus, so its file list is not counted here.)"""
    import psutil

    from lm.config import Config, TokenizerConfig
    from lm.data.clean import clean
    from lm.data.ingest import ingest
    from lm.text.tokenize_stage import tokenize

    me = psutil.Process()
    peak = {"stage": "ingest", "ingest": 0, "clean": 0, "tokenize": 0}
    peak_pss = {"ingest": 0, "clean": 0, "tokenize": 0}
    stop = threading.Event()

    def sample() -> None:
        # RSS summed over forked workers counts their copy-on-write pages shared with this process
        # once per process; PSS (proportional set size) splits each shared page among its sharers,
        # so its sum is the memory the stage really holds. Both are reported.
        while not stop.is_set():
            total = total_pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    total += info.rss
                    total_pss += info.pss
                except psutil.Error:
                    pass
            stage = peak["stage"]
            peak[stage] = max(peak[stage], total)
            peak_pss[stage] = max(peak_pss[stage], total_pss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = Config(
        data=data_config(workers, preset="code", sources=[str(corpus)]),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=8192, train_max_mb=16),
    )
    t = time.perf_counter()
    for d in ("ingest", "clean", "tokens"):
        (work / d).mkdir(parents=True)
    r = ingest(cfg.data, out_dir=work / "ingest")
    peak["stage"] = "clean"
    clean(cfg.data, work / "ingest" / "documents", out_dir=work / "clean")
    peak["stage"] = "tokenize"
    tokenize(cfg, work / "clean", out_dir=work / "tokens")
    stop.set()
    sampler.join()
    print(
        json.dumps(
            {
                "mb": r.metrics["ingest/bytes"] / 2**20,
                "seconds": time.perf_counter() - t,
                **{k: peak[k] / 2**20 for k in ("ingest", "clean", "tokenize")},
                **{f"pss_{k}": peak_pss[k] / 2**20 for k in ("ingest", "clean", "tokenize")},
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-mb", type=float, default=200, help="corpus size for the throughput figures")
    ap.add_argument("--rss-mb", default="50,500", help="two input sizes for the peak-RSS figure ('' to skip)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--rss-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    if args.rss_child is not None:
        rss_child(args.rss_child, work, args.workers)
        return
    if work.exists() and any(work.iterdir()):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, float | str] = {}
    try:
        from lm.config import DataConfig
        from lm.data.dedup import lsh_params
        from lm.data.ingest import ingest

        # The same documents for both tools: our ingest of the corpus files into parquet.
        files = corpus_files(args.max_mb, CORPUS_EXT)
        link_corpus(files, work / "corpus")
        (work / "ingest").mkdir()
        r = ingest(DataConfig(sources=[str(work / "corpus")]), out_dir=work / "ingest")
        mb = r.metrics["ingest/bytes"] / 2**20
        documents = work / "ingest" / "documents"
        figures["corpus_mb"] = round(mb, 1)
        figures["corpus_docs"] = int(r.metrics["ingest/documents"])
        print(
            f"corpus: {len(files)} files, {mb:.1f} MB, ingest {r.metrics['ingest/mb_per_s']:.1f} MB/s",
            file=sys.stderr,
        )

        secs, m = run_lmforge_clean(documents, work / "clean", args.workers)
        figures["lmforge_clean_mb_s"] = round(mb / secs, 2)
        figures["lmforge_docs_out"] = int(m["clean/docs_out"])
        print(
            f"lmforge clean+dedup: {secs:.1f} s, {mb / secs:.2f} MB/s, {int(m['clean/docs_out'])} docs kept "
            f"({int(m['dedup/exact_dups'])} exact, {int(m['dedup/near_dups'])} near dups)",
            file=sys.stderr,
        )

        if not args.skip_datatrove:
            bands, rows = lsh_params(0.8, 128)
            split_for_datatrove(documents, work / "dt_input", files=4 * args.workers)
            dt_secs, dt = run_datatrove(work / "dt_input", work / "datatrove", args.workers, bands, rows)
            figures["datatrove_clean_mb_s"] = round(mb / dt_secs, 2)
            figures["datatrove_docs_out"] = dt["final"]
            figures["clean_ratio"] = round(dt_secs / secs, 2)
            print(f"datatrove: {dt_secs:.1f} s, {mb / dt_secs:.2f} MB/s, {dt}", file=sys.stderr)

        tk = bench_tokenize(work / "clean", work / "tok", args.vocab_size)
        figures["bpe_train_s"] = round(tk["train_s"], 1)
        figures["lmforge_tokens_s"] = int(tk["ours_tps"])
        figures["encode_batch_tokens_s"] = int(tk["hf_tps"])
        figures["tokenize_ratio"] = round(tk["ours_tps"] / tk["hf_tps"], 2)
        print(f"tokenize: {tk}", file=sys.stderr)

        sizes = [float(s) for s in args.rss_mb.split(",") if s]
        for size in sizes:
            child_dir = work / f"rss_{int(size)}"
            link_corpus(corpus_files(size, CORPUS_EXT + EXTRA_EXT), work / f"rss_corpus_{int(size)}")
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--rss-child",
                    str(work / f"rss_corpus_{int(size)}"),
                    "--workdir",
                    str(child_dir),
                    "--workers",
                    str(args.workers),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"rss at {size:.0f} MB: {res}", file=sys.stderr)
            tag = f"{int(size)}mb"
            figures[f"rss_{tag}_input_mb"] = round(res["mb"], 1)
            figures[f"rss_{tag}_peak_mb"] = round(max(res["ingest"], res["clean"], res["tokenize"]))
            figures[f"pss_{tag}_peak_mb"] = round(
                max(res[f"pss_{k}"] for k in ("ingest", "clean", "tokenize"))
            )
            for stage in ("ingest", "clean", "tokenize"):
                figures[f"rss_{tag}_{stage}_mb"] = round(res[stage])
                figures[f"pss_{tag}_{stage}_mb"] = round(res[f"pss_{stage}"])
            figures[f"rss_{tag}_seconds"] = round(res["seconds"], 1)
            shutil.rmtree(child_dir, ignore_errors=True)
            shutil.rmtree(work / f"rss_corpus_{int(size)}", ignore_errors=True)
        if len(sizes) == 2:
            a, b = (f"rss_{int(s)}mb_peak_mb" for s in sizes)
            figures["rss_ratio"] = round(figures[b] / figures[a], 2)
            a, b = (f"pss_{int(s)}mb_peak_mb" for s in sizes)
            figures["pss_ratio"] = round(figures[b] / figures[a], 2)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

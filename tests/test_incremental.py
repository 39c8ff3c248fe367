"""Retraining semantics: a retrain ingests and cleans only new or changed files and ends with the
outputs a full rebuild of the same files writes (byte for byte); a document's train/validation
assignment never changes; a cleaning-config change rebuilds everything; two deploys at once leave the
better version as champion; a warm start from a champion that does not exist yet starts from scratch.

Small generated corpora through the real stage rows (``lm.stages``), the real work-folder layout
(``lm.pipeline.workspace``) and a real MLflow sqlite store."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lm.config import DeployConfig, load_config
from lm.pipeline.stage import StageContext, StageResult, execute, is_complete, stage_by_name
from lm.pipeline.workspace import stage_dirs
from lm.stages import STAGES

COMPARED = {
    "ingest": ("provenance.csv", "doc_digests.npy", "ingest_index.json"),  # and every part of documents/
    "clean": ("train.parquet", "val.parquet", "duplicates.parquet", "dedup_index.parquet", "dedup_signatures.u32",
              "dedup_samples.jsonl", "dropped_samples.jsonl", "length_hist.png"),
}
VOCAB = [
    "".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3 + i % 7)) for i in range(3000)
]


def prose(seed: int, words: int = 160) -> str:
    rng = random.Random(seed)
    ws = [rng.choice(VOCAB) for _ in range(words)]
    return "\n".join(" ".join(ws[i : i + 12]).capitalize() + "." for i in range(0, len(ws), 12)) + "\n"


def near_copy(text: str, seed: int) -> str:
    """The text with one word in ~80 replaced: a near duplicate at Jaccard ~0.9 on 3-word shingles."""
    rng = random.Random(seed)
    ws = text.split(" ")
    for i in rng.sample(range(len(ws)), len(ws) // 80):
        ws[i] = rng.choice(VOCAB)
    return " ".join(ws)


def write_corpus(root: Path) -> None:
    """60 documents, with exact and near duplicates among them and a few too short to keep."""
    root.mkdir(parents=True)
    for i in range(50):
        (root / f"doc{i:03d}.txt").write_text(prose(i))
    for i in range(4):
        (root / f"exact{i}.txt").write_text(prose(i).upper().replace("\n", " \n"))  # equal after normalising
        (root / f"near{i}.txt").write_text(near_copy(prose(10 + i), i))
    (root / "short1.txt").write_text("too short")
    (root / "short2.txt").write_text("also too short")


def config(workdir: Path, corpus: Path, *overrides: str):
    return load_config(
        "conf/tiny.yaml",
        [f"workdir={workdir}", f"data.sources=[{corpus}]", "data.max_docs=null", "data.workers=1",
         "data.row_group_mb=0.004", "data.val_fraction=0.25", "data.clean.preset=prose",
         "data.dedup.shingle_size=3", *overrides],
    )


def run_data(cfg, names: tuple[str, ...] = ("ingest", "clean")) -> dict[str, tuple[Path, StageResult]]:
    """These stages (ingest and clean by default) as the pipeline runs them: reused when their
    folder is complete."""
    stages = [stage_by_name(STAGES, name) for name in names]
    dirs = stage_dirs(cfg, stages)
    out = {}
    for stage in stages:
        if not is_complete(dirs[stage.name]):
            execute(stage, StageContext(cfg, {name: dirs[name] for name in stage.inputs}, dirs[stage.name]))
        out[stage.name] = (dirs[stage.name], StageResult.load(dirs[stage.name]))
    return out


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def ids(folder: Path, split: str) -> set[str]:
    return set(pq.read_table(folder / f"{split}.parquet", columns=["doc_id"]).column(0).to_pylist())


def test_a_retrain_reads_only_new_files_and_equals_a_full_rebuild_of_the_union(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    first = run_data(config(tmp_path / "runs", corpus))
    before = {name: digests(folder) for name, (folder, _) in first.items()}
    train1, val1 = ids(first["clean"][0], "train"), ids(first["clean"][0], "val")
    assert first["clean"][1].metrics["dedup/exact_dups"] >= 3 and first["clean"][1].metrics["dedup/near_dups"] >= 2

    # New data: two new files (one an exact copy of a kept document, sorting before it), one changed
    # file (a kept near-duplicate's original), one removed file.
    (corpus / "a_new_copy.txt").write_text(prose(5))
    (corpus / "zz_new.txt").write_text(prose(1000))
    (corpus / "doc010.txt").write_text(prose(2000))
    (corpus / "doc020.txt").unlink()
    second = run_data(config(tmp_path / "runs", corpus))
    ingest, clean = second["ingest"][1], second["clean"][1]
    assert second["ingest"][0] != first["ingest"][0]
    assert ingest.metrics["ingest/files_read"] == 3
    assert ingest.metrics["ingest/files_reused"] == ingest.metrics["ingest/files"] - 3 == 58
    assert ingest.tags["lmforge.extends"] == str(first["ingest"][0])
    assert clean.metrics["clean/docs_new"] == 3 and clean.metrics["clean/docs_reused"] == 58
    assert clean.tags["lmforge.extends"] == str(first["clean"][0])
    for name, (folder, _) in first.items():
        assert digests(folder) == before[name], f"the earlier {name} folder was modified"

    # The same files from scratch, in another work folder: the same bytes.
    full = run_data(config(tmp_path / "full", corpus))
    assert full["clean"][1].metrics["clean/docs_reused"] == 0 and "lmforge.extends" not in full["clean"][1].tags
    parts = sorted(p.relative_to(full["ingest"][0]) for p in (full["ingest"][0] / "documents").iterdir())
    assert parts == sorted(p.relative_to(second["ingest"][0]) for p in (second["ingest"][0] / "documents").iterdir())
    for name, files in COMPARED.items():
        for f in (*files, *(parts if name == "ingest" else ())):
            assert (second[name][0] / f).read_bytes() == (full[name][0] / f).read_bytes(), f"{name}/{f} differs"
    stats = [json.loads((run["clean"][0] / "stats.json").read_text())["metrics"] for run in (second, full)]
    for s in stats:
        for k in ("clean/seconds", "clean/mb_per_s", "clean/docs_new", "clean/docs_reused"):
            s.pop(k)
    assert stats[0] == stats[1]

    train2, val2 = ids(second["clean"][0], "train"), ids(second["clean"][0], "val")
    assert "doc020.txt" not in train2 | val2  # removed files leave the corpus
    assert {"zz_new.txt", "doc010.txt"} <= train2 | val2
    # The copy that sorts first survives, however the two were cleaned: the new file, not doc005.
    assert "a_new_copy.txt" in train2 | val2 and "doc005.txt" not in train2 | val2
    # Split stability: no document held out in the first run is trained on in the second, and the
    # reverse; every unchanged document keeps its side.
    assert not val1 & train2 and not train1 & val2
    unchanged = (train1 | val1) - {"doc010.txt", "doc020.txt", "doc005.txt"}
    assert unchanged <= train2 | val2


def test_a_retrain_that_keeps_its_tokenizer_encodes_only_new_documents(tmp_path):
    """A warm start keeps the champion's tokenizer; a byte tokenizer is the same in every run too.
    The retrain's tokenize then copies the tokens of documents it encoded before and ends with the
    shards a full encode writes; a run with another tokenizer encodes everything."""
    from lm.text.shards import TokenIndex

    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    stages = ("ingest", "clean", "base_model", "tokenize")
    first = run_data(config(tmp_path / "runs", corpus, "tokenizer.kind=byte"), stages)
    assert first["tokenize"][1].metrics["tokenize/docs_reused"] == 0
    (corpus / "a_new_copy.txt").write_text(prose(5))  # the text of doc005, which it replaces
    (corpus / "zz_new.txt").write_text(prose(1000))
    (corpus / "doc010.txt").write_text(prose(2000))
    (corpus / "doc020.txt").unlink()
    second = run_data(config(tmp_path / "runs", corpus, "tokenizer.kind=byte"), stages)
    folder, result = second["tokenize"]
    kept = result.metrics["tokenize/docs_reused"] + result.metrics["tokenize/docs_encoded"]
    assert kept == second["clean"][1].metrics["clean/docs_out"]
    # Encoded: the kept documents whose text the first run did not keep (zz_new, the changed doc010
    # and the near copy of its old text, which is no longer one); not a_new_copy, whose text it did.
    def texts(run: dict) -> set[str]:
        return {t for split in ("train", "val") for t in pq.read_table(run["clean"][0] / f"{split}.parquet").column("text").to_pylist()}

    new_texts = texts(second) - texts(first)
    assert len(new_texts) == 3 and result.metrics["tokenize/docs_encoded"] == 3
    assert result.tags["lmforge.extends"] == str(first["tokenize"][0])

    full = run_data(config(tmp_path / "full", corpus, "tokenizer.kind=byte"), stages)
    assert full["tokenize"][1].metrics["tokenize/docs_reused"] == 0
    index = TokenIndex.load(folder)
    files = ["index.json", "tokenizer.json", "train_docs.npy", "val_docs.npy",
             *index.splits["train"]["files"], *index.splits["val"]["files"]]
    for name in files:
        assert (folder / name).read_bytes() == (full["tokenize"][0] / name).read_bytes(), f"tokenize/{name} differs"

    # Another tokenizer (BPE trained on this run's data): nothing of the earlier shards is reused.
    bpe = run_data(config(tmp_path / "runs", corpus, "tokenizer.kind=bpe", "tokenizer.vocab_size=300"), stages)
    assert bpe["tokenize"][1].metrics["tokenize/docs_reused"] == 0 and "lmforge.extends" not in bpe["tokenize"][1].tags


def test_a_cleaning_config_change_rebuilds_everything(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    first = run_data(config(tmp_path / "runs", corpus))
    (corpus / "zz_new.txt").write_text(prose(1000))
    for change in ("data.clean.min_chars=150", "data.val_fraction=0.3", "data.seed=7"):
        run = run_data(config(tmp_path / "runs", corpus, change))
        ingest, clean = run["ingest"][1], run["clean"][1]
        assert ingest.metrics["ingest/files_read"] <= 1  # ingest's own settings did not change
        assert clean.metrics["clean/docs_reused"] == 0 and clean.metrics["clean/docs_new"] == 61, change
        assert "lmforge.extends" not in clean.tags, change
    # Another pipeline (name) never extends this one's folders.
    other = run_data(config(tmp_path / "runs", corpus, "name=other", "data.row_group_mb=0.005"))
    assert other["ingest"][1].metrics["ingest/files_reused"] == 0
    assert first["clean"][0].is_dir()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


def _registered_export(root: Path) -> Path:
    """The smallest folder download_registered accepts as an lmforge model: MLmodel + export/model.json."""
    (root / "export").mkdir(parents=True)
    (root / "export" / "model.json").write_text("{}")
    (root / "MLmodel").write_text("flavors:\n  python_function:\n    artifacts:\n      model:\n        path: export\n")
    return root


def test_two_deploys_at_once_leave_the_better_version_as_champion(store, tmp_path):
    """A slow deploy (it re-scores the champion on its evaluation set) decides against the old
    champion while a faster, better one promotes itself; the slow one must not overwrite it."""
    from mlflow.tracking import MlflowClient

    from lm.tracking.registry import DECISION_TAG, EVAL_SET_TAG, _decide_and_move, _move_alias

    client, name, metric = MlflowClient(store), "guarded", "eval/chrf"
    client.create_registered_model(name)
    source = str(_registered_export(tmp_path / "model"))
    for value, eval_set in ((0.5, "old-set"), (0.6, "new-set"), (0.9, "new-set")):
        client.create_model_version(name, source=source, tags={EVAL_SET_TAG: eval_set, metric: str(value)})
    _move_alias(client, name, "champion", "1", None)
    cfg = DeployConfig(model_name=name, promote_metric=metric)
    slow_is_rescoring, fast_done = threading.Event(), threading.Event()
    decisions = {}

    def rescore_slowly(model_dir: Path, scratch: Path) -> dict[str, float]:
        slow_is_rescoring.set()
        assert fast_done.wait(60)
        return {metric: 0.5}

    def deploy_slow():
        holder = client.get_model_version_by_alias(name, "champion")
        decisions["slow"] = _decide_and_move(client, store, cfg, "2", 0.6, "new-set", rescore_slowly, holder)

    slow = threading.Thread(target=deploy_slow)
    slow.start()
    assert slow_is_rescoring.wait(60)
    holder = client.get_model_version_by_alias(name, "champion")
    decisions["fast"] = _decide_and_move(client, store, cfg, "3", 0.9, "new-set", lambda m, s: {metric: 0.5}, holder)
    fast_done.set()
    slow.join(60)
    assert decisions["fast"].promoted
    assert not decisions["slow"].promoted and decisions["slow"].champion_version == "3", decisions["slow"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    assert json.loads(client.get_registered_model(name).tags["lmforge.alias_history.champion"]) == ["1", "3"]
    assert DECISION_TAG not in client.get_model_version(name, "2").tags  # deploy() records; here only the move


def test_warm_start_from_a_champion_that_does_not_exist_yet(store, tmp_path):
    from lm.errors import ConfigError
    from lm.models.source import read_source
    from lm.pipeline.base_model import prepare_base

    overrides = [f"tracking.uri={store}", "model.init_from=models:/not-yet@champion"]
    with pytest.raises(ConfigError, match="not in the registry"):
        prepare_base(load_config("conf/tiny.yaml", overrides), out_dir=tmp_path)
    cfg = load_config("conf/tiny.yaml", [*overrides, "model.init_from_fallback=scratch"])
    result = prepare_base(cfg, out_dir=tmp_path)
    assert read_source(tmp_path) is None  # pretrain from scratch, with lmforge's own tokenizer
    assert result.params["base_model.fallback_from"] == "models:/not-yet@champion"
    assert stage_dirs(cfg, [stage_by_name(STAGES, "base_model")])  # its key is made without the version

"""M-BEIR: readers of the released formats, texts, known rankings in global vs local pools, Recall@k, the
aggregate, and `muco eval --benchmark mbeir` end to end on a tiny exported model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from muco.eval.errors import EvalDataError
from muco.eval.mbeir import (
    GROUPS,
    CandidateStore,
    MBeirCandidate,
    MBeirQuery,
    PoolIndex,
    aggregate,
    build_store,
    candidate_user_text,
    encode_queries,
    evaluate_mbeir,
    first_relevant_ranks,
    format_string,
    format_table,
    global_pool_candidates,
    load_mbeir_config,
    load_mbeir_task,
    pick_instruction,
    query_user_text,
    rank_queries,
    read_instructions,
    read_pool,
    read_qrels,
    read_queries,
    recall_at,
)
from muco.eval.mbeir.tasks import MBeirTaskSpec
from muco.inputs.templates import IMG
from muco.mine.search import chunked_topk
from tests.eval.mbeir_fixtures import FixtureTask, default_tasks, write_mbeir

REPO = Path(__file__).resolve().parents[2]


# ---- readers --------------------------------------------------------------------------------------------------------
def test_readers_take_the_released_shapes(tmp_path):
    yaml = write_mbeir(tmp_path, default_tasks())
    cfg = load_mbeir_config(yaml)
    coco = next(s for s in cfg.tasks if s.name == "mscoco_task3")
    assert coco.pool.name == "mbeir_mscoco_task3_test_cand_pool.jsonl"  # MSCOCO's test pools carry _test
    q = read_queries(coco.queries)
    assert q[1] == MBeirQuery(qid="9:2", text="", image_path="mbeir_images/mscoco_images/query2.jpg",
                              modality="image", task_id=3, positives=("9:2", "9:5"))
    assert read_qrels(coco.qrels).relevant["9:2"] == ("9:2", "9:5")
    news = read_pool(cfg.tasks[0].pool)  # image candidates: txt "" or null, both read as ""
    assert news[0] == MBeirCandidate("0:1", "", "mbeir_images/visualnews_images/cand1.jpg", "image")
    assert [c.text for c in news[:2]] == ["", ""]
    table = read_instructions(cfg.instructions)
    assert len(table[("5", "image,text", "image,text")]) == 3  # the empty fourth cell is dropped
    glob = read_pool(cfg.global_pool)
    assert len(glob) == 27 and [c.did for c in glob[:2]] == ["0:1", "0:2"]


def test_reader_variants(tmp_path):
    """`text,image` spelling, `{"did": ...}` positives (the dataset card's notation), 4-column qrels, limits."""
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"qid": "5:7", "query_txt": "x", "query_img_path": "a.jpg", "query_modality": "text,image",
                             "pos_cand_list": [{"did": "5:1"}, "6:2"]}) + "\n\n")
    q = read_queries(f)[0]
    assert (q.modality, q.positives, q.task_id) == ("image,text", ("5:1", "6:2"), None)
    r = tmp_path / "r.txt"
    r.write_text("5:7 0 5:1 1\n5:7 0 5:9 0\n")
    assert read_qrels(r).relevant == {"5:7": ("5:1",)} and read_qrels(r).task_ids == {"5:7": None}
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"did": f"1:{i}", "txt": f"t{i}", "img_path": None, "modality": "text"}) + "\n"
                         for i in range(6)))
    assert [c.did for c in read_pool(p, limit=2, keep={"1:4"})] == ["1:0", "1:1", "1:4"]


def _line(obj) -> str:
    return (obj if isinstance(obj, str) else json.dumps(obj)) + "\n"


GOOD_Q = {"qid": "0:1", "query_txt": "a", "query_img_path": None, "query_modality": "text", "pos_cand_list": ["0:2"],
          "task_id": 0}
GOOD_C = {"did": "0:1", "txt": "", "img_path": "x.jpg", "modality": "image"}


@pytest.mark.parametrize("reader,what,lines,expected", [
    (read_queries, "queries", [GOOD_Q, "{not json"], "line 2: not valid JSON"),
    (read_queries, "queries", [{**GOOD_Q, "qid": 17}], "line 1: qid must be a string '<dataset_id>:<n>', got 17"),
    (read_queries, "queries", [GOOD_Q, GOOD_Q], "line 2: duplicate qid 0:1 (first on line 1)"),
    (read_queries, "queries", [{**GOOD_Q, "query_txt": None}], "line 1: query 0:1 has neither query_txt nor"),
    (read_queries, "queries", [{**GOOD_Q, "pos_cand_list": "0:2"}], "line 1: pos_cand_list must be a list"),
    (read_queries, "queries", ["[1, 2]"], "line 1: expected a JSON object, got list"),
    (read_pool, "pool", [{**GOOD_C, "modality": "video"}], "line 1: modality must be one of"),
    (read_pool, "pool", [GOOD_C, GOOD_C], "line 2: duplicate did 0:1 (first on line 1)"),
    (read_pool, "pool", [{**GOOD_C, "txt": 3}], "line 1: txt must be a string or null, got int"),
    (read_qrels, "qrels", ["0:1 0 0:2"], "line 1: expected 'qid 0 did relevance [task_id]', got '0:1 0 0:2'"),
    (read_qrels, "qrels", ["0:1 0 0:2 yes 0"], "line 1: relevance and task_id must be integers"),
    (read_qrels, "qrels", ["0:1 0 0:2 1 0", "0:1 0 0:3 1 4"], "line 2: qid 0:1 has task_id 4 here but 0"),
    (read_instructions, "instructions", ["header", "text\timage\tX\t0"], "line 2: expected tab-separated"),
    (read_instructions, "instructions", ["header", "text\tvideo\tX\t0\tgo"], "line 2: bad key ('text', 'video'"),
])
def test_reader_errors_name_file_and_line(tmp_path, reader, what, lines, expected):
    f = tmp_path / "data.txt"
    f.write_text("".join(_line(x) for x in lines))
    with pytest.raises(EvalDataError) as e:
        reader(f)
    msg = str(e.value)
    assert msg.startswith(f"{what} {f}: {expected}"), msg
    assert "\n" not in msg


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(EvalDataError, match=rf"^pool {tmp_path / 'nope.jsonl'}: does not exist$"):
        read_pool(tmp_path / "nope.jsonl")
    with pytest.raises(EvalDataError, match="is a directory"):
        read_qrels(tmp_path)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(EvalDataError, match="not UTF-8"):
        read_queries(tmp_path / "bin.jsonl")


# ---- task list, texts -------------------------------------------------------------------------------------------
def test_the_shipped_task_list(tmp_path, monkeypatch):
    cfg = load_mbeir_config(REPO / "configs/eval/mbeir.yaml", root=tmp_path)
    assert len(cfg.tasks) == 16 and len({s.dataset for s in cfg.tasks}) == 10
    assert {g: sum(s.group == g for s in cfg.tasks) for g in GROUPS} == {"S->S": 8, "S->M": 2, "M->S": 4, "M->M": 2}
    assert {s.name for s in cfg.tasks if s.k == 10} == {"fashion200k_task0", "fashion200k_task3", "fashioniq_task7"}
    assert {s.task_id for s in cfg.tasks} == {0, 1, 2, 3, 4, 6, 7, 8}
    for s in cfg.tasks:
        assert s.name.endswith(f"_task{s.task_id}")
        assert s.queries == tmp_path / f"query/test/mbeir_{s.name}_test.jsonl"
        assert s.qrels == tmp_path / f"qrels/test/mbeir_{s.name}_test_qrels.txt"
        middle = f"{s.name}_test" if s.dataset == "MSCOCO" else s.name
        assert s.pool == tmp_path / f"cand_pool/local/mbeir_{middle}_cand_pool.jsonl"
    assert cfg.global_pool == tmp_path / "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
    assert [s.kind for s in cfg.tasks if s.dataset == "OVEN"] == ["(i,t)->t", "(i,t)->(i,t)"]
    monkeypatch.delenv("MBEIR_ROOT", raising=False)
    with pytest.raises(ValueError, match=r"root '\$\{MBEIR_ROOT\}' needs the environment variable MBEIR_ROOT, which is "
                                         r"not set; export MBEIR_ROOT=DIR \(the data root\) or pass --root DIR"):
        load_mbeir_config(REPO / "configs/eval/mbeir.yaml")
    with pytest.raises(ValueError, match="task_id must be one of"):
        MBeirTaskSpec("x", "X", 5, Path("q"), Path("p"), Path("r"))


def test_query_and_candidate_texts():
    assert format_string(' "a cat on a mat" \r') == "A cat on a mat."
    assert format_string("Is it red?") == "Is it red?" and format_string(None) == ""
    q = MBeirQuery("8:3", "make it blue", "i.jpg", "image,text", 7, ("8:1",))
    # UniIR: format(format(instruction) + " " + query_txt); MuCo: IMG + "\n" + text + "\n"
    assert query_user_text(q, "Find a similar image") == f"{IMG}\nFind a similar image. make it blue.\n"
    assert query_user_text(q) == f"{IMG}\nMake it blue.\n"
    img_only = MBeirQuery("4:1", "", "i.jpg", "image", 4, ("4:2",))
    assert query_user_text(img_only, "find the same scene") == f"{IMG}\nFind the same scene.\n"
    assert candidate_user_text(MBeirCandidate("4:2", "", "c.jpg", "image")) == f"{IMG}\n"
    assert candidate_user_text(MBeirCandidate("5:2", "Red fox. A canid", "c.jpg", "image,text")) == \
        f"{IMG}\nRed fox. A canid.\n"
    assert candidate_user_text(MBeirCandidate("9:2", "a dog", None, "text")) == "A dog.\n"
    with pytest.raises(ValueError, match="reserved string"):
        candidate_user_text(MBeirCandidate("9:3", "a <|emb|> b", None, "text"))
    prompts = ("a", "b", "c", "d")
    picks = {pick_instruction(prompts, f"0:{i}") for i in range(40)}
    assert picks == set(prompts)  # spread over all four, as UniIR's random choice
    assert pick_instruction(prompts, "0:7") == pick_instruction(prompts, "0:7")  # but fixed per qid
    assert pick_instruction(prompts, "0:7", "first") == "a" and pick_instruction(prompts, "0:7", "none") == ""


# ---- recall, known rankings, global vs local -----------------------------------------------------------------------
def test_recall_is_a_hit_rate():
    ranks = first_relevant_ranks([["a", "b", "c"], ["x", "y", "z"], ["q", "r", "s"]], [{"c", "b"}, {"w"}, {"q"}])
    assert ranks == [2, None, 1]
    # UniIR's Recall@k: 1 when any relevant candidate is in the top k (not the fraction of relevant ones found)
    assert recall_at(ranks, (1, 2)) == {"recall@1": 1 / 3, "recall@2": 2 / 3}


def _vec(axis: int, cos: float, dim: int = 8) -> torch.Tensor:
    """Unit vector at cosine ``cos`` to query axis ``axis`` (0..3), the rest on its own noise axis (4..7)."""
    v = torch.zeros(dim)
    v[axis], v[4 + axis] = cos, math.sqrt(1 - cos * cos)
    return v


RANKING_TASKS = [
    # queries: axis 0 (positive 0:1) and axis 1 (positive 0:2)
    FixtureTask("visualnews_task0", "VisualNews", 0, 0, cands={i: "" for i in range(1, 7)},
                queries=[(101, "storm over the harbour", ["0:1"]), (102, "a parade downtown", ["0:2"])]),
    # queries: axis 2 (positive 9:1) and axis 3, whose positive 0:4 lives in the other dataset's pool (as
    # OVEN/InfoSeek queries can have positives outside their local pool)
    FixtureTask("mscoco_task3", "MSCOCO", 9, 3, test_pool_name=True,
                cands={i: f"caption {i}" for i in range(1, 7)}, queries=[(101, "", ["9:1"]), (102, "", ["0:4"])]),
]
CAND_VECS = {"0:1": _vec(0, 0.90), "0:2": _vec(1, 0.80), "0:3": _vec(1, 0.85), "0:4": _vec(3, 0.99),
             "0:5": _vec(0, 0.50), "0:6": _vec(0, 0.40), "9:1": _vec(2, 0.90),
             # five candidates of the other dataset closer to query 0:101 than its positive (0.90)
             **{f"9:{i}": _vec(0, 0.89 + 0.01 * i) for i in range(2, 7)}}
QUERY_AXES = {"0:101": 0, "0:102": 1, "9:101": 2, "9:102": 3}


@pytest.fixture
def ranked(tmp_path):
    cfg = load_mbeir_config(write_mbeir(tmp_path, RANKING_TASKS))
    inst = read_instructions(cfg.instructions)
    tasks = [load_mbeir_task(s, cfg, inst) for s in cfg.tasks]
    glob = global_pool_candidates(cfg, {t.name: t for t in tasks}, inst)
    assert glob[1] == cfg.global_pool  # the released union file
    store, glob_rows, local_rows = build_store(cfg.image_root, tasks, glob)
    assert len(store) == 12 and sorted(glob_rows.tolist()) == list(range(12))  # locals reuse the global rows
    store.emb = torch.stack([CAND_VECS[d] for d in store.dids]).half()  # hand-made embeddings
    results = {}
    for t in tasks:
        queries = torch.zeros(len(t.queries), 8)
        for i, q in enumerate(t.queries):
            queries[i, QUERY_AXES[q.qid]] = 1.0
        indexes = {"global": PoolIndex.build("global", store, glob_rows, chunked_topk),
                   "local": PoolIndex.build(t.name, store, local_rows[t.name], chunked_topk)}
        results[t.name] = rank_queries(t, queries, store, indexes)
        # the exact chunked search does not depend on the chunk sizes
        for index in indexes.values():
            assert torch.equal(index.search(queries, 5, query_chunk=1, corpus_chunk=2)[1], index.search(queries, 5)[1])
    return cfg, results


def test_known_rankings_global_vs_local(ranked):
    cfg, r = ranked
    news, coco = r["visualnews_task0"], r["mscoco_task3"]
    # 0:101: five MSCOCO candidates outrank its positive in the global pool only
    assert news.ranks == {"global": [6, 2], "local": [1, 2]}
    assert news.top["global"][0][:6] == ["9:6", "9:5", "9:4", "9:3", "9:2", "0:1"]
    assert news.metrics["global"] == pytest.approx({"recall@1": 0.0, "recall@5": 0.5, "recall@10": 1.0,
                                                    "recall@20": 1.0, "recall@50": 1.0})
    assert news.metrics["local"]["recall@1"] == 0.5 and news.metrics["local"]["recall@5"] == 1.0
    # 9:102's only positive is another dataset's candidate: found in the global pool, unreachable in the local one
    assert coco.ranks == {"global": [1, 1], "local": [1, None]}
    assert coco.unreachable == {"global": 0, "local": 1}
    assert (coco.score("global"), coco.score("local")) == (1.0, 0.5)
    assert news.pool_sizes == {"global": 12, "local": 6}

    scores = {name: {p: res.score(p) for p in ("global", "local")} for name, res in r.items()}
    agg = aggregate({k: v["global"] for k, v in scores.items()}, cfg.tasks)
    assert agg["overall"] == {"score": 0.75, "n": 2, "expected": 2, "partial": False, "missing": []}
    assert agg["groups"]["S->S"]["score"] == 0.75 and agg["groups"]["M->M"]["score"] is None
    table = format_table(scores, cfg.tasks, ("global", "local")).splitlines()
    assert table[2].split() == ["visualnews_task0", "VisualNews", "t->i", "S->S", "recall@5", "50.0", "100.0"]
    assert table[3].split() == ["mscoco_task3", "MSCOCO", "i->t", "S->S", "recall@5", "100.0", "50.0"]
    assert table[-1].split() == ["Overall", "(2/2)", "75.0", "75.0"]


def test_global_pool_is_the_union_of_the_local_pools(tmp_path):
    """Without the released union file the global pool is made from every task's local pool, even with --only."""
    cfg = load_mbeir_config(write_mbeir(tmp_path, default_tasks(), global_pool=False))
    assert cfg.global_pool is None
    inst = read_instructions(cfg.instructions)
    one = load_mbeir_task(cfg.tasks[0], cfg, inst)
    union, _ = global_pool_candidates(cfg, {one.name: one}, inst)
    assert [c.did for c in union] == [c.did for s in cfg.tasks for c in read_pool(s.pool)]
    # --limit 1: per task the first query, and the first candidate plus that query's positive (CIRR's is 8:2)
    limited, _ = global_pool_candidates(cfg, {}, inst, limit=1)
    assert [c.did for c in limited] == ["0:1", "9:1", "1:1", "2:1", "8:1", "8:2", "5:1"]


def test_the_published_aggregate(tmp_path):
    """Overall is the mean over the 16 tasks, not over the 4 groups: the paper's MuCo-2B / 7B global numbers."""
    cfg = load_mbeir_config(REPO / "configs/eval/mbeir.yaml", root=tmp_path)
    for groups, overall in (({"S->S": 49.1, "S->M": 68.2, "M->S": 41.6, "M->M": 64.8}, 51.6),
                            ({"S->S": 54.0, "S->M": 71.6, "M->S": 47.4, "M->M": 70.4}, 56.6)):
        agg = aggregate({s.name: groups[s.group] for s in cfg.tasks}, cfg.tasks)
        assert round(agg["overall"]["score"], 1) == overall
        assert round(sum(groups.values()) / 4, 1) != overall
        assert {g: agg["groups"][g]["score"] for g in GROUPS} == pytest.approx(groups)
    partial = aggregate({"visualnews_task0": 0.5}, cfg.tasks)
    assert partial["overall"]["partial"] and partial["overall"]["n"] == 1 and len(partial["overall"]["missing"]) == 15
    with pytest.raises(ValueError, match="not in the task list"):
        aggregate({"nope": 1.0}, cfg.tasks)


# ---- task-level checks ----------------------------------------------------------------------------------------------
def test_task_errors_are_one_line_and_name_the_task(tmp_path):
    cfg = load_mbeir_config(write_mbeir(tmp_path, default_tasks()))
    inst = read_instructions(cfg.instructions)
    news = cfg.tasks[0]
    wrong = MBeirTaskSpec(news.name, news.dataset, 1, news.queries, news.pool, news.qrels)
    with pytest.raises(EvalDataError, match=rf"^task visualnews_task0, queries {news.queries}: qid 0:1 has task_id 0, "
                                            "but the task list says 1$"):
        load_mbeir_task(wrong, cfg, inst)
    news.qrels.write_text("0:1 0 0:1 1 0\n")
    with pytest.raises(EvalDataError, match=rf"qrels {news.qrels}: no relevant candidate for qid 0:2"):
        load_mbeir_task(news, cfg, inst)
    with pytest.raises(EvalDataError, match="qid 9:1: the instruction table has no row for dataset id 9"):
        load_mbeir_task(cfg.tasks[1], cfg, {})

    cirr = load_mbeir_task(cfg.tasks[4], cfg, inst)
    (tmp_path / cirr.queries[1].image_path).unlink()
    with pytest.raises(EvalDataError, match=r"^task cirr_task7, image .*query2.jpg: query_img_path of qid 8:2 in "):
        encode_queries(lambda t, i: torch.ones(len(t), 4), cirr)
    store = CandidateStore(cfg.image_root)
    store.add(read_pool(cfg.tasks[2].pool), cfg.tasks[2].pool)
    (tmp_path / "mbeir_images/fashion200k_images/cand3.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(EvalDataError, match=r"img_path of did 1:3 in .*mbeir_fashion200k_task0_cand_pool.jsonl: "
                                            "not an image Pillow can read"):
        store.embed(lambda t, i: torch.ones(len(t), 4))
    with pytest.raises(EvalDataError, match="did 1:1 has a different txt or img_path"):
        store.add([MBeirCandidate("1:1", "other", None, "text")], Path("other.jsonl"))


def test_candidate_embeddings_are_cached_in_blocks(tmp_path):
    cfg = load_mbeir_config(write_mbeir(tmp_path, default_tasks()))
    store = CandidateStore(cfg.image_root)
    store.add(read_pool(cfg.global_pool), cfg.global_pool)
    calls = []

    def encode(texts, images):
        calls.append(len(texts))
        return torch.stack([torch.tensor([len(t), float(im is not None), 1.0]) for t, im in zip(texts, images)])

    first = store.embed(encode, batch_size=4, cache_dir=tmp_path / "emb", cache_key="m", block_size=10).clone()
    assert sum(calls) == 27 and sorted(p.name for p in (tmp_path / "emb").iterdir()) == [
        "cand-00000.pt", "cand-00001.pt", "cand-00002.pt"]
    assert first.dtype == torch.float16 and torch.allclose(first.float().norm(dim=1), torch.ones(27), atol=1e-3)
    calls.clear()
    assert torch.equal(store.embed(encode, cache_dir=tmp_path / "emb", cache_key="m", block_size=10), first)
    assert calls == []  # every block reused
    store.embed(encode, cache_dir=tmp_path / "emb", cache_key="another model", block_size=10)
    assert sum(calls) == 27


# ---- the command ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tiny_encoder, tmp_path_factory):
    from muco.export import export
    from muco.inputs.image_policy import ImagePolicy

    root = tmp_path_factory.mktemp("mbeir_model")
    return export(tiny_encoder.backbone, tiny_encoder.tokenizer, ImagePolicy.preset("tiny"), root / "model")


def _args(model, tasks, out, *extra):
    return ["--benchmark", "mbeir", "--model", str(model), "--tasks", str(tasks), "--output", str(out),
            "--device", "cpu", "--image-policy", "tiny", "--batch-size", "4", *extra]


def test_mbeir_command_end_to_end(exported, tmp_path, capsys, monkeypatch):
    from muco.cli.eval import main
    from muco.encoder import MuCoEncoder

    tasks = write_mbeir(tmp_path / "mbeir", default_tasks())
    out = tmp_path / "out"
    assert main(_args(exported, tasks, out)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "dataset", "kind", "group", "metric", "global", "local"]
    assert [line.split()[0] for line in table[2:8]] == [t.name for t in default_tasks()]
    assert table[3].split()[:5] == ["mscoco_task3", "MSCOCO", "i->t", "S->S", "recall@5"]
    assert table[4].split()[4] == "recall@10"  # Fashion200K
    assert [line.split()[0] for line in table[9:]] == [*GROUPS, "Overall"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["failed"] == {}
    assert summary["pools"]["global"]["overall"]["n"] == 6
    assert summary["pools"]["local"]["groups"]["M->M"]["expected"] == 1
    rec = json.loads((out / "oven_task8.json").read_text())
    assert (rec["group"], rec["metric"], rec["pool_sizes"], rec["num_queries"]) == (
        "M->M", "recall@5", {"global": 27, "local": 4}, 2)
    pred = [json.loads(x) for x in (out / "cirr_task7.pred.jsonl").read_text().splitlines()]
    assert [p["qid"] for p in pred] == ["8:1", "8:2"] and len(pred[0]["global"]["top"]) == 10
    assert len(pred[0]["local"]["top"]) == 4 and set(pred[0]["local"]["top"]) == {"8:1", "8:2", "8:3", "8:4"}
    assert len(list((out / "embeddings").iterdir())) == 1

    # the same numbers as the library called directly on the exported model
    enc = MuCoEncoder.from_pretrained(exported, image_policy="tiny")
    direct = evaluate_mbeir(enc.encode_user_texts, load_mbeir_config(tasks), chunked_topk, batch_size=4)
    for name, res in direct.items():
        assert summary["tasks"][name] == res.metrics  # recall values are fractions of 2 queries: exact

    # a rerun with the same settings reuses every task: no model is loaded
    def no_model(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("muco.cli.eval_mbeir.load_encode_fn", no_model)
    assert main(_args(exported, tasks, out)) == 0
    assert "Overall (6/6)" in capsys.readouterr().out


def test_mbeir_command_limit_pools_and_failures(exported, tmp_path, capsys):
    from muco.cli.eval import main

    root = tmp_path / "mbeir"
    tasks = write_mbeir(root, default_tasks())
    with open(tasks, "a") as f:  # a task whose files are not there
        f.write("  - {name: nights_task4, dataset: NIGHTS, task_id: 4, queries: query/test/mbeir_nights_task4_test"
                ".jsonl, pool: cand_pool/local/mbeir_nights_task4_cand_pool.jsonl, qrels: qrels/test/x.txt}\n")
    out = tmp_path / "out"
    assert main(_args(exported, tasks, out, "--limit", "1", "--pool", "local")) == 1
    cap = capsys.readouterr()
    assert "global" not in cap.out.splitlines()[0]
    assert f"task nights_task4, queries {root}/query/test/mbeir_nights_task4_test.jsonl: does not exist" in cap.err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["failed"]) == ["nights_task4"] and summary["pools"]["local"]["overall"]["n"] == 6
    coco = json.loads((out / "mscoco_task3.json").read_text())
    assert coco["num_queries"] == 1 and coco["pool_sizes"] == {"local": 1}  # first candidate = the positive 9:1
    assert main(_args(exported, tasks, out, "--limit", "1", "--pool", "local", "--skip-missing")) == 0
    assert "skipping 1 task(s) without data" in capsys.readouterr().err

    # with a global pool, limited: the union of the limited local pools of the tasks that have data
    assert main(_args(exported, tasks, tmp_path / "g", "--limit", "1", "--pool", "global", "--only",
                      "oven_task8")) == 0
    oven = json.loads((tmp_path / "g" / "oven_task8.json").read_text())
    assert oven["pool_sizes"] == {"global": 7} and oven["metrics"].keys() == {"global"}
    assert "partial (global pool): 1 of 7 tasks scored" in capsys.readouterr().out


def test_benchmark_flags(tmp_path, capsys):
    from muco.cli.eval import main

    with pytest.raises(SystemExit):
        main(["--model", "m", "--tasks", "t", "--output", "o", "--pool", "local"])
    assert "--pool is an M-BEIR option" in capsys.readouterr().err
    tasks = write_mbeir(tmp_path, default_tasks()[:1])
    assert main(["--model", "m", "--tasks", str(tasks), "--output", str(tmp_path / "o")]) == 2
    assert f"{tasks} is an M-BEIR task list; add --benchmark mbeir" in capsys.readouterr().err
    assert main(_args("m", tasks, tmp_path / "o", "--only", "nope")) == 2
    assert "unknown tasks ['nope']" in capsys.readouterr().err
    (tmp_path / "instructions/query_instructions.tsv").unlink()
    assert main(_args("m", tasks, tmp_path / "o")) == 1
    assert "instructions/query_instructions.tsv does not exist" in capsys.readouterr().err

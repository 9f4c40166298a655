"""The harness: hand-computed metrics with a stub encoder, de-duplication, and the real tiny model."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from muco.eval.harness import evaluate_task, evaluate_tasks, load_image
from muco.eval.metrics import gold_rank, ranking_metrics
from muco.eval.tasks import Task, TaskSpec
from muco.eval.text import MMEBQuery, candidates, query_text, to_user_text
from muco.inputs.templates import IMG

VEC = {"cat": [1.0, 0.0, 0.0], "dog": [0.0, 1.0, 0.0], "bird": [0.0, 0.0, 1.0],
       "q1": [0.9, 0.1, 0.3], "q2": [0.2, 0.8, 0.1], "q3": [0.7, 0.1, 0.5]}


class StubEncoder:
    """Hand-chosen vectors keyed by a word of the user text; records every call."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.calls: list[int] = []

    def __call__(self, texts, images):
        self.calls.append(len(texts))
        self.seen += texts
        out = []
        for t, im in zip(texts, images):
            assert (im is not None) == (IMG in t)  # one image exactly where the text has its placeholder
            # candidates are the bare label; queries carry their key word after the instruction
            key = t.strip() if t.strip() in VEC else t.split()[-1]
            out.append(VEC[key])
        return 3 * torch.tensor(out)  # not normalised: the harness must normalise


def cls_task(image_dir) -> Task:
    rows = [("q1", ["cat", "dog", "bird"]), ("q2", ["dog", "cat", "bird"]), ("q3", ["bird", "cat", "dog"])]
    queries = [MMEBQuery(qry_inst="<|image_1|>\nRepresent the given image for classification", qry_text=q,
                         qry_img_path=f"{i}.png", tgt_inst="", tgt_text=tuple(c), tgt_img_path=("",) * 3)
               for i, (q, c) in enumerate(rows)]
    return Task(TaskSpec("Toy", "classification", "ind", "text", image_root=image_dir), queries)


def test_stub_encoder_gives_hand_computed_metrics(image_dir):
    stub = StubEncoder()
    result = evaluate_task(stub, cls_task(image_dir), batch_size=2)
    # q1 -> cat (gold), q2 -> dog (gold), q3 -> cat although gold is bird (rank 2)
    assert result.metrics["precision@1"] == pytest.approx(2 / 3)
    assert result.metrics["hit@5"] == pytest.approx(1.0)
    assert result.metrics["mrr"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert result.metrics["ndcg@10"] == pytest.approx((1 + 1 + 1 / torch.log2(torch.tensor(3.0)).item()) / 3)
    assert result.gold_ranks == [1, 1, 2]
    assert result.top1 == ["cat", "dog", "cat"]
    assert evaluate_tasks(StubEncoder(), [cls_task(image_dir)], batch_size=4) == {"Toy": result.metrics}


def test_each_distinct_candidate_is_encoded_once(image_dir):
    stub = StubEncoder()
    result = evaluate_task(stub, cls_task(image_dir), batch_size=2)
    assert (result.num_candidates, result.num_candidate_refs, result.num_queries) == (3, 9, 3)
    counts = Counter(stub.seen)
    assert len(stub.seen) == 6 and set(counts.values()) == {1}
    assert {"cat\n", "dog\n", "bird\n"} <= set(counts)
    assert max(stub.calls) <= 2


def test_image_candidates_dedup_by_path_or_path_caption(image_dir):
    def row(caps, inst="Represent the given image."):
        return MMEBQuery(qry_inst="Find the cat:", qry_text="q1", qry_img_path="", tgt_inst=inst,
                         tgt_text=tuple(caps), tgt_img_path=("0.png", "0.png", "1.png"))

    seen: list[str] = []

    def enc(texts, images):
        seen.extend(texts)
        return torch.randn(len(texts), 4)

    spec = TaskSpec("G", "grounding", "ood", "image_caption", image_root=image_dir)
    res = evaluate_task(enc, Task(spec, [row(["cat", "dog", ""]), row(["cat", "dog", ""])]), batch_size=8)
    assert res.num_candidates == 3 and res.num_candidate_refs == 6 and res.name_conflicts == 0
    # by path only (t2i): the two entries of 0.png are one candidate; a different tgt_inst is a conflict
    spec = TaskSpec("T", "retrieval", "ind", "image", image_root=image_dir)
    res = evaluate_task(enc, Task(spec, [row(["", "", ""]), row(["", "", ""], inst="Other.")]), batch_size=8)
    assert res.num_candidates == 2 and res.name_conflicts == 3  # all three entries of the second query


def test_ranking_metrics_validation_and_gold_rank():
    with pytest.raises(ValueError):
        ranking_metrics([torch.zeros(3)], [torch.zeros(2, dtype=torch.bool)])
    s, r = torch.tensor([0.1, 0.5, 0.1, 0.3]), torch.tensor([True, False, True, False])
    assert gold_rank(s, r) == 3


def test_real_tiny_model_matches_brute_force(tiny_encoder, image_dir):
    """Batched, de-duplicated harness == encoding every (query, candidate) on its own."""
    def q(i, text, caps, paths, img=True):
        return MMEBQuery(qry_inst="<|image_1|>\nRepresent the given image with the question:", qry_text=text,
                         qry_img_path=f"{i}.png" if img else "", tgt_inst="<|image_1|>\nRepresent the image.",
                         tgt_text=tuple(caps), tgt_img_path=tuple(paths))

    tasks = [
        Task(TaskSpec("QA", "vqa", "ind", "text", image_root=image_dir),
             [q(0, "what?", ["a man", "a cat", "coffee"], ["", "", ""]),
              q(1, "which animal?", ["a cat", "a man", "a rocket"], ["", "", ""]),
              q(2, "drink?", ["coffee", "a cat"], ["", ""])]),
        Task(TaskSpec("T2I", "retrieval", "ind", "image", image_root=image_dir),
             [q(0, "a cat", [], ["1.png", "0.png", "3.png"], img=False),
              q(0, "a rocket", [], ["3.png", "2.png"], img=False)]),
        Task(TaskSpec("GRD", "grounding", "ood", "image_caption", image_root=image_dir),
             [q(4, "the cameraman", ["man", "horse"], ["4.png", "5.png"])]),
    ]
    for task in tasks:
        res = evaluate_task(tiny_encoder.encode_user_texts, task, batch_size=3)
        ranks = []
        for row in task.queries:
            img = image_dir / row.qry_img_path if row.qry_img_path else None
            qe = tiny_encoder.encode_user_texts([to_user_text(query_text(row))],
                                                [load_image(img) if img else None])
            cands = candidates(row, task.spec.candidates)
            ce = tiny_encoder.encode_user_texts(
                [to_user_text(c.text) for c in cands],
                [load_image(image_dir / c.image_path) if c.image_path else None for c in cands], batch_size=1)
            scores = ce @ qe[0]
            ranks.append(gold_rank(scores, torch.tensor([c.name == cands[0].name for c in cands])))
        assert res.gold_ranks == ranks, task.name
        assert res.metrics["precision@1"] == pytest.approx(sum(r == 1 for r in ranks) / len(ranks))


def test_image_errors_name_the_task_row_column_and_file(image_dir, tmp_path):
    """A missing image is found before anything is encoded; a truncated or corrupt one when it is read."""
    from muco.eval.errors import EvalDataError

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.png").write_bytes((image_dir / f"{i}.png").read_bytes())

    def t2i(paths_per_row):
        queries = [MMEBQuery(qry_inst="Find me an image:", qry_text=f"caption {i}", qry_img_path="",
                             tgt_inst="<|image_1|>\nRepresent the given image.", tgt_text=("",) * len(p),
                             tgt_img_path=tuple(p)) for i, p in enumerate(paths_per_row)]
        return Task(TaskSpec("T2I", "retrieval", "ind", "image", image_root=imgs), queries)

    calls = []

    def enc(texts, images):
        calls.append(len(texts))
        return torch.randn(len(texts), 4)

    task = t2i([["0.png", "1.png"], ["1.png", "gone.png", "2.png"], ["gone.png", "also_gone.png"]])
    with pytest.raises(EvalDataError) as e:
        evaluate_task(enc, task, batch_size=2)
    err = e.value
    assert (err.task, err.row, err.column, err.file) == ("T2I", 1, "tgt_img_path[1]", str(imgs / "gone.png"))
    assert str(err) == (f"task T2I, row 1 (tgt_img_path[1]), image {imgs / 'gone.png'}: image file not found "
                        "(and 1 more missing image)")
    assert calls == []  # found before any encoding

    data = (imgs / "2.png").read_bytes()
    (imgs / "2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(EvalDataError, match=r"task T2I, row 1 \(tgt_img_path\[1\]\), image .*2.png: "
                                            r"truncated or corrupt image \(OSError: image file is truncated"):
        evaluate_task(enc, t2i([["0.png", "1.png"], ["1.png", "2.png"]]), batch_size=2)
    (imgs / "2.png").write_bytes(b"GIF89a but not really")
    with pytest.raises(EvalDataError, match=r"row 1 \(tgt_img_path\[1\]\), image .*2.png: not an image"):
        evaluate_task(enc, t2i([["0.png", "1.png"], ["1.png", "2.png"]]), batch_size=2)


def test_a_cache_encodes_candidates_shared_by_tasks_once(image_dir):
    from muco.eval.harness import EmbeddingCache

    stub, cache = StubEncoder(), EmbeddingCache()
    first = evaluate_task(stub, cls_task(image_dir), batch_size=2, cache=cache)
    assert len(cache) == 3 and cache.hits == 0
    stub.seen.clear()
    again = evaluate_task(stub, cls_task(image_dir), batch_size=2, cache=cache)
    assert len(stub.seen) == 3 and not {"cat\n", "dog\n", "bird\n"} & set(stub.seen)  # the queries only
    assert cache.hits == 3
    assert again.metrics == first.metrics and again.gold_ranks == first.gold_ranks

"""The dataset builder on the shipped sources: schema, balance, split disjointness, determinism, validity rates."""

import difflib
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import pytest

from lynx.data.__main__ import main
from lynx.data.build import SPLITS, build, window_passage
from lynx.data.reasoning import word_checks
from lynx.data.text import near_duplicate_clusters, normalize
from lynx.prompt import format_prompt

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"

HALUBENCH_KEYS = ["id", "passage", "question", "answer", "label", "source_ds"]


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Everything shipped, default options (the build the issue times: under a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("full")
    stats = build(out, seed=17, token_stats=False, log=lambda *a: None)
    return out, stats


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """Everything shipped, with the demo's passage windows."""
    out = tmp_path_factory.mktemp("windowed")
    stats = build(out, seed=17, max_passage_chars=300, token_stats=False, log=lambda *a: None)
    return out, stats


def all_rows(out):
    return [{**r, "split": split} for split in SPLITS for r in read(out / f"halubench_{split}.jsonl")]


def _collapse(text):
    return " ".join(text.split())


def _raw_json(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _raw_jsonl(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _drop_answer_spellings(answer):
    if answer["number"]:
        return {answer["number"]}
    date = answer["date"]
    if any(date.values()):
        day, month, year = date["day"], date["month"], date["year"]
        return {" ".join(p for p in parts if p) for parts in ((month, day, year), (day, month, year), (year,))}
    return {", ".join(answer["spans"])}


@pytest.fixture(scope="module")
def raw_questions():
    """(source, normalised question) -> [(whitespace-collapsed passage, gold answers)], read from data/raw directly
    (not through lynx.data.sources), every gold answer the source gives."""
    out = defaultdict(list)
    for name in ("qa_one-turn_data.jsonl.gz", "qa_multi-turn_data.jsonl.gz"):
        for obj in _raw_jsonl(RAW / "halueval" / name):
            out["halueval", normalize(obj["question"])].append((_collapse(obj["knowledge"]), {obj["right_answer"]}))
    for obj in _raw_json(RAW / "pubmedqa" / "ori_pqal.json.gz").values():
        gold = obj["final_decision"].capitalize() + ". " + obj["LONG_ANSWER"]
        out["pubmedqa", normalize(obj["QUESTION"])].append((_collapse(" ".join(obj["CONTEXTS"])), {gold}))
    for doc in _raw_json(RAW / "covidqa" / "200423_covidQA.json.gz")["data"]:
        for para in doc["paragraphs"]:
            context = _collapse(para["context"])
            for qa in para["qas"]:
                out["covidqa", normalize(qa["question"])].append((context, {a["text"] for a in qa["answers"]}))
    for obj in _raw_json(RAW / "drop" / "drop_contrast_sets_test.json.gz").values():
        for qa in obj["qa_pairs"]:
            out["drop", normalize(qa["question"])].append(
                (_collapse(obj["passage"]), _drop_answer_spellings(qa["answer"])))
    for obj in _raw_jsonl(RAW / "financebench" / "financebench_open_source.jsonl.gz"):
        evidence = " ".join(dict.fromkeys(e["evidence_text"] for e in obj["evidence"]))
        out["financebench", normalize(obj["question"])].append((_collapse(evidence), {obj["answer"]}))
    return out


@pytest.mark.parametrize("build_name", ["full", "windowed"])
def test_no_fail_answer_is_a_gold_answer_of_the_raw_source(build_name, raw_questions, request):
    out, _ = request.getfixturevalue(build_name)
    raw = raw_questions
    rows = all_rows(out)
    collapsed = {p: _collapse(p) for p in {r["passage"] for r in rows}}  # each COVID-QA paper once, not per row
    for r in rows:
        # The gold answers the raw source gives for this question on this passage (or on the passage it is cut from).
        passage = collapsed[r["passage"]]
        matches = [golds for text, golds in raw[r["source_ds"], normalize(r["question"])] if passage in text]
        assert matches, (r["id"], "not found in data/raw")
        golds = {normalize(g) for gs in matches for g in gs}
        if r["label"] == "PASS":
            assert normalize(r["answer"]) in golds, r["id"]
        else:
            assert normalize(r["answer"]) not in golds, (r["id"], r["answer"])
    labels = defaultdict(set)
    for r in rows:
        labels[normalize(r["question"]), collapsed[r["passage"]], normalize(r["answer"])].add(r["label"])
    assert [key for key, seen in labels.items() if len(seen) > 1] == []


def _word_5grams(text):
    words = text.lower().split()
    return {tuple(words[i:i + 5]) for i in range(max(1, len(words) - 4))}


@pytest.mark.parametrize("build_name", ["full", "windowed"])
def test_no_near_duplicate_passages_in_two_splits(build_name, request):
    """Measured here independently of the builder's rule: Jaccard of whitespace word 5-grams, and difflib's ratio of
    the word sequences, for every pair of passages in different splits that share a 5-gram (a pair sharing none has
    no matching run of five words, so it is no near-duplicate by either measure)."""
    out, _ = request.getfixturevalue(build_name)
    split_of = {r["passage"]: r["split"] for r in all_rows(out)}
    passages = sorted(split_of)
    grams = [_word_5grams(p) for p in passages]
    words = [p.split() for p in passages]
    word_counts = [Counter(w) for w in words]
    with_gram = defaultdict(list)
    for i, g in enumerate(grams):
        for gram in g:
            with_gram[gram].append(i)
    pairs = {(a, b) for ids in with_gram.values() for a, b in combinations(ids, 2)
             if split_of[passages[a]] != split_of[passages[b]]}
    assert pairs  # the measure looks at something: passages of different splits do share phrases
    for a, b in sorted(pairs):
        jaccard = len(grams[a] & grams[b]) / len(grams[a] | grams[b])
        assert jaccard < 0.5, (jaccard, passages[a][:200], passages[b][:200])
        # The share of words the two have in common (as multisets) bounds difflib's ratio from above (it is
        # SequenceMatcher.quick_ratio, from counts computed once): the slow ratio only runs when it is high.
        common = sum((word_counts[a] & word_counts[b]).values())
        if 2 * common / (len(words[a]) + len(words[b])) >= 0.8:
            ratio = difflib.SequenceMatcher(None, words[a], words[b], autojunk=False).ratio()
            assert ratio < 0.8, (ratio, passages[a][:200], passages[b][:200])


def test_drop_contrast_set_edits_share_a_split(full):
    """DROP's contrast set writes edited copies of a passage (ids "history_1234_1", "_2", ... of "history_1234"):
    every copy of one original passage is in the split of the others."""
    drop = _raw_json(RAW / "drop" / "drop_contrast_sets_test.json.gz")
    split_of = {_collapse(r["passage"]): r["split"] for r in all_rows(full[0]) if r["source_ds"] == "drop"}
    by_original = defaultdict(set)
    for passage_id, obj in drop.items():
        by_original[re.match(r"[a-z]+_\d+", passage_id).group()].add(split_of[_collapse(obj["passage"])])
    edited = [pid for pid in drop if re.fullmatch(r"[a-z]+_\d+_\d+", pid)]
    assert len(edited) >= 10
    assert all(len(splits) == 1 for splits in by_original.values()), dict(by_original)


def test_near_duplicate_clusters():
    original = ("The Ravens scored first when Terrence West ran for a 2-yard touchdown. The Browns answered with a "
                "field goal from 40 yards, and the Ravens led 7-3 at the half after a long drive stalled.")
    edited = original.replace("2-yard", "5-yard").replace("40 yards", "42 yards")
    unrelated = "Spanish forces scored a series of striking successes in the spring of 1625, taking Breda."
    window = original.split(". ")[1]  # most of a longer passage's 5-grams are not in it, but all of its own are
    assert near_duplicate_clusters([original, unrelated, edited, window]) == [0, 1, 0, 0]
    assert near_duplicate_clusters([unrelated, unrelated.upper()]) == [0, 0]  # case and punctuation do not matter
    assert near_duplicate_clusters([]) == []


def test_files_schema_and_targets(full):
    out, stats = full
    for split in SPLITS:
        chat, halu = read(out / f"chat_{split}.jsonl"), read(out / f"halubench_{split}.jsonl")
        assert len(chat) == len(halu) > 0
        for c, h in zip(chat, halu):
            assert list(h) == HALUBENCH_KEYS and h["id"] == c["id"] and h["label"] in ("PASS", "FAIL")
            assert c["split"] == split and c["label"] == h["label"] and c["source"] == h["source_ds"]
            user, assistant = c["messages"]
            assert user == {"role": "user", "content": format_prompt(h["question"], h["passage"], h["answer"])}
            assert assistant["role"] == "assistant"
            target = json.loads(assistant["content"])
            assert list(target) == ["REASONING", "SCORE"] and target["SCORE"] == h["label"]
            # The public Lynx parser reads bullets with a non-greedy "[...]": no bullet may contain "]".
            m = re.search(r'"REASONING":\s*\[(.*?)\]', assistant["content"])
            assert json.loads("[" + m.group(1) + "]") == target["REASONING"]
            assert (c["perturbation"] is None) == (h["label"] == "PASS")


def test_balanced_per_split_and_source(full):
    out, stats = full
    for split in SPLITS:
        per_source = defaultdict(Counter)
        for c in read(out / f"chat_{split}.jsonl"):
            per_source[c["source"]][c["label"]] += 1
        assert set(per_source) == {"halueval", "pubmedqa", "covidqa", "drop", "financebench"}
        for source, counts in per_source.items():
            assert counts["PASS"] == counts["FAIL"] > 0, (split, source)
        assert {s: dict(c) for s, c in per_source.items()} == stats["examples"][split]
    total = sum(sum(c.values()) for s in SPLITS for c in stats["examples"][s].values())
    assert 0.65 < sum(sum(c.values()) for c in stats["examples"]["train"].values()) / total < 0.75


def test_no_passage_or_question_in_two_splits(full):
    out, _ = full
    passages, questions, groups = {}, {}, {}
    for split in SPLITS:
        rows = read(out / f"halubench_{split}.jsonl")
        chats = read(out / f"chat_{split}.jsonl")
        passages[split] = {r["passage"] for r in rows}
        questions[split] = {normalize(r["question"]) for r in rows}
        groups[split] = {c["group"] for c in chats}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not passages[a] & passages[b], (a, b)
            assert not questions[a] & questions[b], (a, b)
            assert not groups[a] & groups[b], (a, b)


def test_validity_rates_on_real_sources(full):
    _, stats = full
    rates = {kind: t["validity_rate"] for kind, t in stats["perturbation"]["all"].items()}
    tried = {kind: t["tried"] for kind, t in stats["perturbation"]["all"].items()}
    # Every type is attempted on the real data (dates and units are rare in answers: tens of rows, not hundreds).
    assert all(tried[k] >= 15 for k in ("number", "unit", "date", "entity", "polarity", "antonym", "added_claim",
                                        "other_answer", "hallucinated")), tried
    # Floors. The check refuses a candidate only when it is a no-op or the passage still supports it, so a type
    # whose candidates are refused more than a quarter of the time is broken (e.g. a number generator proposing
    # values the passage contains, or entity distractors that equal the gold). added_claim gets 0.7: its check also
    # refuses any claim whose random number or country happens to occur somewhere in a 20k-character COVID-QA paper
    # (measured 0.84 at seed 17); other_answer (0.95 measured) refuses other questions' answers that overlap this one.
    floors = {"added_claim": 0.7}
    for kind, rate in rates.items():
        assert rate >= floors.get(kind, 0.75), (kind, rate)
    # Nearly every question gets a FAIL answer (the only loss is answers no type applies to).
    for source, q in stats["questions"].items():
        assert q["kept"] >= 0.95 * q["loaded"], (source, q)


def test_fail_reasoning_names_the_change(full):
    out, _ = full
    for c in read(out / "chat_val.jsonl"):
        if c["perturbation"] and c["perturbation"]["type"] not in ("hallucinated", "other_answer"):
            reasoning = " ".join(json.loads(c["messages"][1]["content"])["REASONING"])
            edit = c["perturbation"]["edits"][0]
            shown = " ".join(edit["after"].split()).replace('"', "'")[:100].strip(" .")
            assert shown in reasoning, (c["id"], shown)
            assert "DOCUMENT" in reasoning


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_deterministic_and_windowed(tmp_path):
    kwargs = dict(max_per_source=40, max_passage_chars=1500, token_stats=False, log=lambda *a: None)
    build(tmp_path / "a", seed=17, **kwargs)
    # The same build in another process with another string-hash seed: no set or dict order may leak into files.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "lynx.data", "build", "--out", str(tmp_path / "b"), "--seed", "17",
                    "--max-per-source", "40", "--max-passage-chars", "1500", "--no-token-stats"],
                   check=True, env=env, capture_output=True)
    build(tmp_path / "c", seed=18, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    rows = [r for s in SPLITS for r in read(tmp_path / "a" / f"halubench_{s}.jsonl")]
    assert Counter(r["source_ds"] for r in rows) == {s: 40 for s in ("halueval", "pubmedqa", "covidqa", "drop",
                                                                      "financebench")}
    assert max(len(r["passage"]) for r in rows) <= 1500
    # COVID-QA and FinanceBench gold answers are quoted from the passage: the window keeps them.
    for r in rows:
        if r["label"] == "PASS" and r["source_ds"] == "covidqa":
            assert r["answer"] in r["passage"]


def test_window_passage():
    passage = " ".join(f"Sentence number {i} is here." for i in range(100))
    target = passage.index("Sentence number 50")
    window = window_passage(passage, (target, target + 27), 200)
    assert len(window) <= 200 and "Sentence number 50 is here." in window and window in passage
    assert window.startswith("Sentence") and window.endswith("here.")
    assert window_passage("short", (0, 5), 200) == "short"


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["build", "--out", str(out), "--seed", "3", "--sources", "drop", "halueval",
                 "--max-per-source", "10", "--no-token-stats"]) == 0
    printed = capsys.readouterr().out
    assert "examples per split" in printed and "validity" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sources"] == ["drop", "halueval"] and stats["questions"]["drop"]["kept"] == 5
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{kind}_{s}.jsonl" for kind in ("chat", "halubench") for s in SPLITS] + ["stats.json"])
    assert main(["build", "--out", str(out), "--max-per-source", "1"]) == 1
    assert "at least 2" in capsys.readouterr().err
    assert main(["build", "--out", str(out), "--sources", "drop", "--max-per-source", "10", "--no-token-stats",
                 "--train-fail-variants", "2"]) == 0
    assert json.loads((out / "stats.json").read_text())["train_fail_variants"] == 2
    assert main(["build", "--out", str(out), "--sources", "drop", "--max-per-source", "40", "--no-token-stats",
                 "--train-document-edits"]) == 0
    assert json.loads((out / "stats.json").read_text())["train_document_edits"] > 0
    assert main(["build", "--out", str(out), "--train-fail-variants", "0"]) == 1
    with pytest.raises(SystemExit):
        main(["build", "--out", str(out), "--sources", "ragtruth"])


def test_token_stats(tmp_path):
    pytest.importorskip("lynx.tokenizer")
    stats = build(tmp_path, seed=17, sources=("halueval",), max_per_source=20, log=lambda *a: None)
    lengths = stats["token_lengths"]["halueval"]
    assert lengths["n"] == 20 and 150 < lengths["median"] < 1000 and lengths["over_8000"] == 0


def test_train_fail_variants_add_training_pairs_only(tmp_path):
    kwargs = dict(max_per_source=40, max_passage_chars=1500, token_stats=False, log=lambda *a: None)
    build(tmp_path / "one", seed=17, **kwargs)
    stats = build(tmp_path / "three", seed=17, train_fail_variants=3, **kwargs)
    one, three = _digest(tmp_path / "one"), _digest(tmp_path / "three")
    for split in ("val", "test"):  # evaluation files do not change
        for kind in ("chat", "halubench"):
            assert one[f"{kind}_{split}.jsonl"] == three[f"{kind}_{split}.jsonl"]
    base = read(tmp_path / "one" / "chat_train.jsonl")
    rows = read(tmp_path / "three" / "chat_train.jsonl")
    assert {r["id"] for r in base} <= {r["id"] for r in rows}  # the K=1 pairs are all still there
    assert len({r["id"] for r in rows}) == len(rows) > 2 * len(base)
    by_question = defaultdict(lambda: {"PASS": [], "FAIL": []})
    for r in rows:
        question = r["id"].rsplit("-", 1)[0]
        by_question[question][r["label"]].append(r["messages"][0]["content"])
    for question, labels in by_question.items():
        assert 1 <= len(labels["FAIL"]) <= 3 and len(labels["PASS"]) == len(labels["FAIL"]), question
        assert len(set(labels["PASS"])) == 1  # copies of one PASS example
        assert len(set(labels["FAIL"])) == len(labels["FAIL"])  # different FAIL answers
    assert sum(len(v["FAIL"]) == 3 for v in by_question.values()) > 0.8 * len(by_question)
    assert stats["train_fail_variants"] == 3
    with pytest.raises(ValueError, match="train_fail_variants"):
        build(tmp_path / "zero", train_fail_variants=0, **kwargs)


def _document_and_answer(row):
    """(DOCUMENT, ANSWER) of a chat row's Lynx prompt."""
    from lynx.prompt import DOCUMENT_END, DOCUMENT_START

    content = row["messages"][0]["content"]
    start, end = content.index(DOCUMENT_START) + len(DOCUMENT_START), content.rindex(DOCUMENT_END)
    return content[start:end], content[end + len(DOCUMENT_END):].split("\n--\n")[0].strip()


def test_train_document_edits_add_four_rows_only_a_comparison_separates(tmp_path):
    kwargs = dict(max_per_source=60, token_stats=False, log=lambda *a: None, train_contexts="window:300")
    build(tmp_path / "plain", seed=17, **kwargs)
    stats = build(tmp_path / "edits", seed=17, train_document_edits=True, **kwargs)
    plain, edits = _digest(tmp_path / "plain"), _digest(tmp_path / "edits")
    for split in ("val", "test"):  # evaluation rows are not edited
        for kind in ("chat", "halubench"):
            assert plain[f"{kind}_{split}.jsonl"] == edits[f"{kind}_{split}.jsonl"]
    base = {r["id"]: r for r in read(tmp_path / "plain" / "chat_train.jsonl")}
    rows = {r["id"]: r for r in read(tmp_path / "edits" / "chat_train.jsonl")}
    assert all(rows[i] == r for i, r in base.items())  # every plain row is still there, unchanged
    edited = [r for r in rows.values() if (r["perturbation"] or {}).get("type") == "document_edit"]
    assert len(edited) == stats["train_document_edits"] > 0.25 * len(base) / 2
    for fail in edited:
        question = fail["id"][: -len("-fail2")]
        assert fail["id"] == question + "-fail2" and fail["label"] == "FAIL"
        gold_pass, new_pass = rows[question + "-pass"], rows[question + "-pass2"]
        document, gold = _document_and_answer(gold_pass)
        edited_document, answer = _document_and_answer(fail)
        assert answer == gold and edited_document != document  # the gold answer, on the edited document
        assert _document_and_answer(new_pass)[0] == edited_document and new_pass["label"] == "PASS"
        for e in fail["perturbation"]["edits"]:  # the document now says the new words where it said the old ones
            assert e["after"].strip() in edited_document and e["after"].strip() in _document_and_answer(new_pass)[1]
        # Outside the replaced words the document is the same text.
        changed = [op for op in difflib.SequenceMatcher(None, document, edited_document, autojunk=False).get_opcodes()
                   if op[0] != "equal"]
        assert sum(i2 - i1 for _, i1, i2, _, _ in changed) <= sum(len(e["before"]) for e in fail["perturbation"]["edits"]) * 3


def test_word_checks_look_up_each_answer_word_like_the_lexical_rule():
    passage = "In 2019, 120 patients were enrolled in Boston; none of them (0%) were smokers."
    assert word_checks("140 patients in boston, and the 140 were Smokers-free", passage) == [
        "Answer words found in the DOCUMENT: 140 no, patients yes, boston yes, Smokers yes, free no."]
    # stopwords and repeats are not checked; an answer of stopwords only has nothing to check
    assert word_checks("no", passage) == ["Answer words found in the DOCUMENT: none to check."]
    # "patients" is not in "patient": whole words only
    assert word_checks("patient", passage) == ["Answer words found in the DOCUMENT: patient no."]
    many = " ".join(f"w{i}" for i in range(30))
    assert word_checks(many, passage, max_words=3) == ["Answer words found in the DOCUMENT: w0 no, w1 no, w2 no."]


def test_train_contexts_mix_windows_selections_and_whole_passages_and_leave_val_test_whole(tmp_path):
    from lynx.context import ELISION, token_counter
    from lynx.data.build import parse_train_contexts
    from lynx.data.reasoning import evidence_span
    from lynx.tokenizer import Tokenizer

    kwargs = dict(max_per_source=60, sources=("covidqa", "financebench", "drop"), token_stats=False,
                  log=lambda *a: None)
    plain = build(tmp_path / "plain", seed=17, **kwargs)
    stats = build(tmp_path / "mix", seed=17, train_contexts="window:300,select:128,whole", **kwargs)
    build(tmp_path / "again", seed=17, train_contexts="window:300,select:128,whole", **kwargs)
    assert _digest(tmp_path / "mix") == _digest(tmp_path / "again")
    assert stats["train_contexts"] == "window:300,select:128,whole"
    forms = stats["train_context_questions"]
    assert set(forms) == {"window:300", "select:128", "whole"} and sum(forms.values()) == sum(
        sum(c.values()) for c in plain["examples"]["train"].values()) // 2
    for split in ("val", "test"):  # the judge selects from whole documents itself
        for name in (f"halubench_{split}.jsonl", f"chat_{split}.jsonl"):
            assert (tmp_path / "mix" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    whole = {r["id"]: r["passage"] for r in read(tmp_path / "plain" / "halubench_train.jsonl")}
    gold = {r["id"]: r["answer"] for r in read(tmp_path / "plain" / "halubench_train.jsonl") if r["label"] == "PASS"}
    count = token_counter(Tokenizer.llama3())
    seen = Counter()
    for r in read(tmp_path / "mix" / "halubench_train.jsonl"):
        document, shown = whole[r["id"]], r["passage"]
        if shown == document:
            seen["whole or short"] += 1
        elif ELISION.strip() in shown:
            seen["selected"] += 1
            assert count(shown) <= 128
        else:
            seen["window"] += 1
            assert len(shown) <= 300 and shown in document
        if shown != document:  # the gold evidence is always shown, to PASS and FAIL answers alike
            s, e = evidence_span(gold[re.sub(r"-fail$", "-pass", r["id"])], r["question"], document)
            assert document[s:e][:60] in shown or len(document[s:e]) > 300
    assert seen["selected"] and seen["window"] and seen["whole or short"]
    for bad in ("select", "window:50", "select:8", "full", "whole:3", ""):
        with pytest.raises(ValueError, match="train contexts"):
            parse_train_contexts(bad)
    assert main(["build", "--out", str(tmp_path / "bad"), "--train-contexts", "select:x", "--no-token-stats"]) == 1


# --- --source-file: a team's own QA records ---------------------------------------------------------------------


def test_own_qa_file_builds_balanced_deterministic_splits_with_no_document_in_two(tmp_path):
    from lynx.data.map import load_rows as map_rows
    from lynx.data.source_file import SourceFile
    from tests.test_data_sources import OWN_DOCUMENTS, own_domain_records

    path = tmp_path / "handbook.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in own_domain_records()))
    kwargs = dict(sources=(), source_files=[SourceFile.parse(str(path))], token_stats=False, log=lambda *a: None)
    stats = build(tmp_path / "a", seed=17, **kwargs)
    assert main(["build", "--out", str(tmp_path / "b"), "--seed", "17", "--sources", "none", "--source-file",
                 str(path), "--no-token-stats"]) == 0
    build(tmp_path / "c", seed=18, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "handbook.jsonl"]  # no staging left

    assert stats["sources"] == ["handbook"] and stats["questions"]["handbook"]["kept"] == 40
    rows = {s: read(tmp_path / "a" / f"halubench_{s}.jsonl") for s in SPLITS}
    for split, split_rows in rows.items():
        labels = Counter(r["label"] for r in split_rows)
        assert split_rows and labels["PASS"] == labels["FAIL"], split
        assert stats["examples"][split] == {"handbook": dict(sorted(labels.items()))}
    splits_of_document = defaultdict(set)
    for split, split_rows in rows.items():
        for r in split_rows:
            splits_of_document[r["passage"]].add(split)
    assert len(splits_of_document) == 10 and all(len(s) == 1 for s in splits_of_document.values())

    all_rows = [r for split_rows in rows.values() for r in split_rows]
    gold = {r["question"]: r["answer"] for r in all_rows if r["label"] == "PASS"}
    fails = {r["question"]: r["answer"] for r in all_rows if r["label"] == "FAIL"}
    assert set(gold) == set(fails) and len(gold) == 40
    assert all(normalize(fails[q]) != normalize(gold[q]) for q in gold)
    # The first document's questions carry their own hallucinated answers: those are the FAIL answers.
    for question, answer in OWN_DOCUMENTS[0][1]:
        assert fails[question] == f"Not stated, but probably {answer.lower()} plus two"
    types = stats["fail_types"]["handbook"]
    assert types["hallucinated"] == 4 and sum(types.values()) == 40 and len(types) > 2  # perturbations applied
    assert {r["source"] for r in map_rows(tmp_path / "a")} == {"handbook"}  # the data map covers it


def test_source_files_alongside_shipped_sources_and_mapped_columns(tmp_path):
    import csv

    from tests.test_data_sources import own_domain_records

    path = tmp_path / "handbook.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["doc", "q", "gold"])
        w.writerows([[r["passage"], r["question"], r["answer"]] for r in own_domain_records()])
    out = tmp_path / "out"
    assert main(["build", "--out", str(out), "--sources", "halueval", "--max-per-source", "20", "--no-token-stats",
                 "--source-file", f"{path}:hr", "--columns", "passage=doc,question=q,answer=gold"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sources"] == ["halueval", "hr"]
    assert {src for split in SPLITS for src in stats["examples"][split]} == {"halueval", "hr"}
    assert stats["questions"]["hr"]["kept"] == 10  # --max-per-source 20 applies to every source


def test_bad_source_files_fail_with_named_errors_and_write_nothing(tmp_path, capsys):
    from tests.test_data_sources import own_domain_records
    from tests.test_rows import bad_input_files

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in own_domain_records()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.json").write_text("an earlier build\n")
    (tmp_path / "bad").mkdir()
    for bad, message in bad_input_files(tmp_path / "bad") + [(f"{good}:halueval", "the source name 'halueval' is taken")]:
        # The good file loads first: the bad one fails the build half-way.
        code = main(["build", "--out", str(out), "--sources", "halueval", "--max-per-source", "20",
                     "--no-token-stats", "--source-file", str(good), "--source-file", str(bad)])
        err = capsys.readouterr().err
        assert code != 0 and message in err and str(bad).split(":")[0] in err, err
        assert sorted(p.name for p in out.iterdir()) == ["stats.json"]
        assert (out / "stats.json").read_text() == "an earlier build\n"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_build_that_fails_after_writing_its_files_leaves_out_as_it_was(tmp_path):
    from lynx.data.source_file import SourceFile
    from tests.test_data_sources import own_domain_records

    path = tmp_path / "handbook.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in own_domain_records()))

    def fail_at_the_summary(message):  # the summary is logged once every file is written
        if message.startswith("examples per split"):
            raise RuntimeError("interrupted")

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "stats.json").write_text("an earlier build\n")
    for out in (tmp_path / "fresh", earlier):
        with pytest.raises(RuntimeError, match="interrupted"):
            build(out, sources=(), source_files=[SourceFile.parse(str(path))], token_stats=False,
                  log=fail_at_the_summary)
    assert not (tmp_path / "fresh").exists() and [p.name for p in earlier.iterdir()] == ["stats.json"]
    assert (tmp_path / "earlier" / "stats.json").read_text() == "an earlier build\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "handbook.jsonl"]  # no staging folder left

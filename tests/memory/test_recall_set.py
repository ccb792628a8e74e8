"""The recall-quality set (benchmarks/recall_set.py) is deterministic and correctly labelled:
same seed, same corpus; every question has one or two evidence turns, earlier user turns of
the same user; a no-overlap question shares no content word with its evidence; updates have
both turns labelled; turn texts are unique per user (Remember would deduplicate them)."""

from __future__ import annotations

from dataclasses import asdict

from benchmarks.recall_set import STOPWORDS, content_stems, generate, overlap

USERS = 3


def test_same_seed_same_corpus_other_seed_other_corpus() -> None:
    a, b = generate(seed=11, users=USERS), generate(seed=11, users=USERS)
    assert [asdict(t) for t in a.turns] == [asdict(t) for t in b.turns]
    assert [asdict(q) for q in a.questions] == [asdict(q) for q in b.questions]
    c = generate(seed=12, users=USERS)
    assert [t.text for t in c.turns] != [t.text for t in a.turns]


def test_evidence_labels_point_at_earlier_user_turns_of_the_same_user() -> None:
    corpus = generate(seed=7, users=USERS)
    by_key = {(t.user_id, t.index): t for t in corpus.turns}
    assert len(corpus.questions) >= 15 * USERS
    for q in corpus.questions:
        assert 1 <= len(q.evidence) <= 2, q
        assert len(set(q.evidence)) == len(q.evidence)
        for i in q.evidence:
            turn = by_key[(q.user_id, i)]
            assert turn.user_id == q.user_id
            assert turn.role == "user"
            assert turn.label == "evidence"
            assert i <= q.asked_after, q
        if q.category == "update":
            assert len(q.evidence) == 2
            a, b = (by_key[(q.user_id, i)] for i in q.evidence)
            assert a.day < b.day  # the update comes in a later session
    evidence_turns = {(t.user_id, t.index) for t in corpus.turns if t.label == "evidence"}
    labelled = {(q.user_id, i) for q in corpus.questions for i in q.evidence}
    assert evidence_turns == labelled  # no unlabelled evidence hiding among the fillers


def test_no_overlap_questions_share_no_content_word_with_their_evidence() -> None:
    corpus = generate(seed=7, users=USERS)
    by_key = {(t.user_id, t.index): t for t in corpus.turns}
    cats = {q.category for q in corpus.questions}
    assert cats == {"overlap", "no_overlap", "update"}
    for q in corpus.questions:
        evidence = [by_key[(q.user_id, i)].text for i in q.evidence]
        plain = {w.strip("?.,!'%$():;") for w in q.text.lower().split()} - STOPWORDS
        ev_words = {w.strip("?.,!'%$():;") for e in evidence for w in e.lower().split()}
        if q.category == "no_overlap":
            assert not (plain - {""}) & ev_words, (q.text, evidence)
            assert not content_stems(q.text) & set().union(*map(content_stems, evidence))
            assert q.overlap == 0
        elif q.category == "overlap":
            assert overlap(q.text, evidence) > 0
        assert q.text not in evidence  # never word for word


def test_sizes_sessions_and_unique_texts() -> None:
    corpus = generate(seed=7, users=USERS)
    for uid in corpus.users:
        turns = corpus.user_turns(uid)
        assert len(turns) >= 250
        assert len({t.text for t in turns}) == len(turns)
        days = sorted({t.day for t in turns})
        assert len(days) >= 5
        assert (days[-1] - days[0]).days >= 60  # spans months
        assert len({t.session_id for t in turns}) == len(days)

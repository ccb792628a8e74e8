"""A deterministic, labelled recall-quality set: long multi-session conversations of several
users about finance, with personal facts ("evidence") buried among filler, and later
questions whose answers sit in one or two of those earlier turns, worded differently.

    corpus = generate(seed=7, users=8)

Everything comes from `random.Random(seed)` and the template pools below: no network, no
data files. Per user: `SESSIONS` sessions on dates months apart, `TURNS_PER_SESSION` user
turns each (every user turn followed by a short assistant reply). Evidence turns come from
topic builders (risk tolerance, holdings, goals, exclusions, family, job, tax, broker,
currency, ...); each builder returns the evidence text(s) with slot values filled, a pool of
questions a user would ask about it later, and distractors (turns that share the question's
words but do not answer it: market talk about the same ticker, other people's situations,
general questions on the same subject). Updates ("I sold my Tesla" after "I own 50 TSLA")
label both turns as evidence.

Question categories are computed, not declared: `no_overlap` when the question shares no
content word with its evidence (after lower-casing, removing `STOPWORDS` and a crude
plural/suffix stem, see `content_stems`), `overlap` otherwise, and `update` for questions
about a fact that changed (whatever their overlap). The builder is asked for a no-overlap
or an overlap question in turn and takes one of its candidates that fits.

docs/memory.md ("Recall quality") describes the set and what it does not cover.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta

SESSIONS = 6
TURNS_PER_SESSION = 50

# Function words and conversational glue: what "content word" excludes. Larger than the
# service's BM25 stop list on purpose (a no-overlap question must not share even "much").
_STOP_TEXT = """
    a about above after again against all am an and any are aren as at be because been
    before being below between both but by can cannot could couldn d did didn do does doesn
    doing don down during each few for from further get got had hadn has hasn have haven
    having he her here hers herself him himself his how i if in into is isn it its itself
    just ll m ma me might mightn more most much must mustn my myself need no nor not now o of
    off on once only or other our ours ourselves out over own re s same shan she should
    shouldn so some such t than that the their theirs them themselves then there these they
    this those through to too under until up very was wasn we were weren what when where
    which while who whom why will with won would wouldn y you your yours yourself
    yourselves ve let lets okay ok please tell remind again know think right still also
    anything something thing things one ever really well yes yeah hey hi
"""
STOPWORDS = frozenset(_STOP_TEXT.split())

_WORD = re.compile(r"[a-z0-9]+")


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def content_stems(text: str) -> set[str]:
    """Content words of `text`: lower-cased runs of letters/digits, minus `STOPWORDS` and
    one-letter tokens, crudely stemmed ("shares" and "share" count as the same word)."""
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 1}


def overlap(question: str, evidence: list[str]) -> float:
    """Share of the question's content words found in its evidence (0: none)."""
    q = content_stems(question)
    ev: set[str] = set().union(*(content_stems(e) for e in evidence))
    return len(q & ev) / len(q) if q else 0.0


# -- data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    user_id: str
    session_id: str
    day: date
    index: int  # position in the user's whole conversation (user and assistant turns)
    role: str  # "user" | "assistant"
    text: str
    label: str  # "filler" | "evidence" | "distractor" | "reply"


@dataclass(frozen=True)
class Question:
    qid: str
    user_id: str
    text: str
    category: str  # "overlap" | "no_overlap" | "update"
    topic: str
    evidence: tuple[int, ...]  # Turn.index of the evidence turns (same user, earlier)
    asked_after: int  # Turn.index after which the question is asked
    overlap: float


@dataclass
class Corpus:
    seed: int
    users: list[str]
    turns: list[Turn]
    questions: list[Question]

    def user_turns(self, user_id: str) -> list[Turn]:
        return [t for t in self.turns if t.user_id == user_id and t.role == "user"]

    def stats(self) -> dict[str, object]:
        cats: dict[str, int] = {}
        ovl: dict[str, list[float]] = {}
        for q in self.questions:
            cats[q.category] = cats.get(q.category, 0) + 1
            ovl.setdefault(q.category, []).append(q.overlap)
        user_turns = [t for t in self.turns if t.role == "user"]
        return {
            "seed": self.seed,
            "users": len(self.users),
            "turns": len(self.turns),
            "user_turns": len(user_turns),
            "evidence_turns": sum(t.label == "evidence" for t in user_turns),
            "distractor_turns": sum(t.label == "distractor" for t in user_turns),
            "sessions_per_user": SESSIONS,
            "questions": len(self.questions),
            "questions_by_category": dict(sorted(cats.items())),
            "two_evidence_questions": sum(len(q.evidence) == 2 for q in self.questions),
            "mean_overlap": round(
                sum(q.overlap for q in self.questions) / max(1, len(self.questions)), 3
            ),
            "mean_overlap_by_category": {
                c: round(sum(v) / len(v), 3) for c, v in sorted(ovl.items())
            },
        }


# -- slot values ---------------------------------------------------------------------------
# (ticker, company, sector); tickers that differ from the company's name as a word.
COMPANIES = [
    ("AAPL", "Apple", "tech"),
    ("MSFT", "Microsoft", "tech"),
    ("NVDA", "Nvidia", "semiconductors"),
    ("AMZN", "Amazon", "retail"),
    ("GOOGL", "Alphabet", "tech"),
    ("TSLA", "Tesla", "autos"),
    ("JPM", "JPMorgan", "banks"),
    ("KO", "Coca-Cola", "consumer staples"),
    ("PEP", "PepsiCo", "consumer staples"),
    ("XOM", "Exxon", "energy"),
    ("CVX", "Chevron", "energy"),
    ("JNJ", "Johnson & Johnson", "healthcare"),
    ("PG", "Procter & Gamble", "consumer staples"),
    ("MA", "Mastercard", "payments"),
    ("DIS", "Disney", "media"),
    ("NFLX", "Netflix", "media"),
    ("COST", "Costco", "retail"),
    ("WMT", "Walmart", "retail"),
    ("HD", "Home Depot", "retail"),
    ("NKE", "Nike", "consumer"),
    ("SBUX", "Starbucks", "consumer"),
    ("INTC", "Intel", "semiconductors"),
    ("ORCL", "Oracle", "tech"),
    ("CRM", "Salesforce", "software"),
    ("ADBE", "Adobe", "software"),
    ("PFE", "Pfizer", "pharma"),
    ("MRK", "Merck", "pharma"),
    ("BA", "Boeing", "aerospace"),
    ("CAT", "Caterpillar", "industrials"),
    ("GS", "Goldman Sachs", "banks"),
    ("BAC", "Bank of America", "banks"),
    ("VZ", "Verizon", "telecom"),
    ("MCD", "McDonald's", "restaurants"),
    ("UNH", "UnitedHealth", "healthcare"),
    ("LLY", "Eli Lilly", "pharma"),
    ("ABBV", "AbbVie", "pharma"),
    ("TSM", "Taiwan Semiconductor", "semiconductors"),
    ("SHOP", "Shopify", "software"),
    ("PYPL", "PayPal", "payments"),
]
ETFS = ["VOO", "VTI", "QQQ", "SPY", "SCHD", "VXUS", "BND", "IWM", "VEA", "AGG"]
BROKERS = [
    "Fidelity",
    "Schwab",
    "Vanguard",
    "Interactive Brokers",
    "Robinhood",
    "E*Trade",
    "Merrill Edge",
    "Webull",
    "Trading 212",
    "Degiro",
]
# (city, currency as people say it, country)
PLACES = [
    ("London", "pounds", "the UK"),
    ("Berlin", "euros", "Germany"),
    ("Toronto", "Canadian dollars", "Canada"),
    ("Zurich", "Swiss francs", "Switzerland"),
    ("Sydney", "Aussie dollars", "Australia"),
    ("Paris", "euros", "France"),
    ("Tokyo", "yen", "Japan"),
    ("Chicago", "US dollars", "the States"),
    ("Dublin", "euros", "Ireland"),
    ("Singapore", "Singapore dollars", "Singapore"),
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
SECTORS = sorted({c[2] for c in COMPANIES})
CONCEPTS = [
    "duration",
    "convexity",
    "contango",
    "the yield curve",
    "free cash flow",
    "EBITDA",
    "a stock buyback",
    "a covered call",
    "tax-loss harvesting",
    "dollar-cost averaging",
    "the Sharpe ratio",
    "beta",
    "a reverse split",
    "short interest",
    "an inverted yield curve",
    "the expense ratio",
    "a limit order",
    "implied volatility",
    "book value",
    "the PEG ratio",
]


@dataclass
class Spec:
    """One personal fact (or a fact and its update) of a user, with what is asked about it."""

    topic: str
    evidence: list[str]
    questions: list[str]
    distractors: list[str] = field(default_factory=list)
    update: bool = False


Builder = Callable[[random.Random, dict[str, object]], Spec]


def _company(rng: random.Random, used: dict[str, object]) -> tuple[str, str, str]:
    taken = used.setdefault("tickers", set())
    assert isinstance(taken, set)
    choice = rng.choice([c for c in COMPANIES if c[0] not in taken])
    taken.add(choice[0])
    return choice


def _market_talk(rng: random.Random, ticker: str, name: str) -> list[str]:
    """Turns about the same company that say nothing about the user's position."""
    pool = [
        f"What did {name} guide for next quarter?",
        f"Why is {ticker} down {rng.randint(2, 9)}% today?",
        f"Is {ticker} still a buy above ${rng.randint(40, 600)}?",
        f"How many shares of {ticker} do insiders hold these days?",
        f"Did {name} buy back a lot of stock last year?",
        f"What's the short interest on {ticker} right now?",
        f"Can you pull up {name}'s margins for the last five years?",
        f"How much of the S&P 500 is {name} now?",
        f"I read that {name} shares got downgraded, what was the reasoning?",
    ]
    return rng.sample(pool, 3)


# -- topic builders --------------------------------------------------------------------------
def risk_tolerance(rng: random.Random, used: dict[str, object]) -> Spec:
    low = [
        "I can't stomach big swings, keep things steady for me.",
        "Honestly a 20% drop would keep me up at night, I'd rather have boring and stable.",
        "When everything tanked in 2022 I panicked and sold near the bottom. "
        "I know I'm the cautious type.",
    ]
    high = [
        "Wild swings don't bother me at all, I'm in it for the long haul and the upside.",
        "I'm comfortable going aggressive, a 40% drawdown wouldn't make me sell.",
    ]
    evidence = rng.choice(low + high)
    return Spec(
        "risk_tolerance",
        [evidence],
        [
            "What's my risk appetite?",
            "How much risk am I comfortable with?",
            "Am I a conservative or an aggressive investor?",
            "How would I react if the market dropped a lot?",
            "How volatile can my portfolio be before I get nervous?",
            "How do I handle big swings or a sharp drop?",
            "Remind me, am I the cautious type or aggressive?",
        ],
        [
            "What's the risk-free rate these days?",
            "Is the market's risk appetite fading after the selloff?",
            "My brother is super aggressive, he put everything into small caps.",
            "How do funds measure risk, is it just standard deviation?",
        ],
    )


def holding(rng: random.Random, used: dict[str, object]) -> Spec:
    ticker, name, _ = _company(rng, used)
    qty = rng.choice([15, 20, 25, 40, 60, 75, 120, 150, 200, 300])
    month = rng.choice(MONTHS)
    evidence = rng.choice(
        [
            f"We bought {qty} shares of {name} back in {month}.",
            f"Picked up {qty} {name} shares in {month}, averaging in slowly.",
            f"My biggest single position is {name}, {qty} shares, held in the taxable account.",
            f"I've got {qty} {ticker} sitting in my brokerage account.",
        ]
    )
    return Spec(
        "holding",
        [evidence],
        [
            f"How much {ticker} do I hold?",
            f"What's the size of my {ticker} position?",
            f"How many {name} shares do I own?",
            f"Do I own any {name}?",
            f"How big is my stake in {ticker}?",
        ],
        _market_talk(rng, ticker, name),
    )


def holding_sold(rng: random.Random, used: dict[str, object]) -> Spec:
    ticker, name, _ = _company(rng, used)
    qty = rng.choice([10, 30, 50, 80, 100, 250])
    first = rng.choice(
        [f"I own {qty} {ticker}.", f"I've had {qty} shares of {name} for a few years now."]
    )
    second = rng.choice(
        [
            f"I sold my {name} position, took the profit and moved on.",
            f"Dumped all of my {ticker} this morning, I was done with the drama.",
            f"Got out of {name} completely last week.",
        ]
    )
    return Spec(
        "holding_sold",
        [first, second],
        [
            f"Do I still have any {ticker}?",
            f"Am I still invested in {name}?",
            f"What happened with my {name} stake?",
            f"How many {ticker} shares are left in my account?",
        ],
        _market_talk(rng, ticker, name),
        update=True,
    )


def holding_added(rng: random.Random, used: dict[str, object]) -> Spec:
    ticker, name, _ = _company(rng, used)
    qty, more = rng.choice([(40, 20), (100, 50), (25, 25), (60, 40), (200, 100)])
    first = rng.choice(
        [f"I hold {qty} shares of {name}.", f"Started a {ticker} position, {qty} shares."]
    )
    second = rng.choice(
        [
            f"Added another {more} {ticker} on the dip yesterday.",
            f"Bought {more} more {name} when it fell after earnings.",
        ]
    )
    return Spec(
        "holding_added",
        [first, second],
        [
            f"How many {name} shares do I own now?",
            f"What's my total {ticker} position after the last purchase?",
            f"How much {ticker} have I accumulated?",
        ],
        _market_talk(rng, ticker, name),
        update=True,
    )


def etf_core(rng: random.Random, used: dict[str, object]) -> Spec:
    etf = rng.choice(ETFS)
    pct = rng.choice([50, 60, 70, 80])
    return Spec(
        "etf_core",
        [
            rng.choice(
                [
                    f"Most of my money, like {pct}%, is just parked in {etf}.",
                    f"The core of everything I have is {etf}, roughly {pct} percent.",
                ]
            )
        ],
        [
            "What's the main fund in my portfolio?",
            "Where is most of my money invested?",
            "Where is the bulk of my savings invested?",
            f"How much of my allocation goes to {etf}?",
        ],
        [f"What's the expense ratio on {etf}?", f"Is {etf} better than a total world fund?"],
    )


def retirement_goal(rng: random.Random, used: dict[str, object]) -> Spec:
    now = used.get("age")
    floor = now + 3 if isinstance(now, int) else 0  # older than the user's stated age
    age = rng.choice([a for a in (50, 55, 58, 60, 62, 65) if a >= floor] or [floor + 2])
    used["retire_at"] = age
    return Spec(
        "retirement_goal",
        [
            rng.choice(
                [
                    f"The dream is to retire at {age} and never look back.",
                    f"I want to be done with work by {age}, that's the whole plan.",
                    f"If I can quit the 9-to-5 at {age} I'll be happy.",
                ]
            )
        ],
        [
            "When do I plan to stop working?",
            "At what age am I hoping to retire?",
            "What's my target retirement age?",
            "When do I want to be done with work?",
            "At what age did I say I'd quit my job?",
            "How long until I can leave my job for good?",
        ],
        [
            "What's the average retirement age in the US now?",
            "My parents retired late and regret it.",
            "Is the 4% rule still valid for early retirement?",
        ],
    )


def house_goal(rng: random.Random, used: dict[str, object]) -> Spec:
    year = rng.choice([2027, 2028, 2029, 2030])
    amount = rng.choice(["60k", "80k", "100k", "120k"])
    first = rng.choice(
        [
            "We're saving up for a place of our own, renting is killing us.",
            "My partner and I really want to stop renting and get a flat.",
        ]
    )
    second = rng.choice(
        [
            f"For the deposit we need about {amount}, ideally by {year}.",
            f"The down payment target is {amount} and we'd like to have it by {year}.",
        ]
    )
    return Spec(
        "house_goal",
        [first, second],
        [
            "How much do we need for the home purchase, and by when?",
            "What's our timeline and budget for buying a house?",
            "When are we hoping to buy property, and for what deposit?",
            "What down payment are we aiming for, and when?",
        ],
        [
            "Are house prices expected to fall next year?",
            "What do mortgage rates look like right now?",
            "My sister just bought a house with 5% down.",
        ],
    )


def college_goal(rng: random.Random, used: dict[str, object]) -> Spec:
    year = rng.choice([2031, 2033, 2035, 2038])
    amount = rng.choice(["40,000", "75,000", "100,000"])
    if used.get("kids") == "no":  # no children of their own (family builder)
        kid = rng.choice(["niece", "nephew", "godson"])
    else:
        kid = rng.choice(["daughter", "son"])
        used["kids"] = "yes"
    return Spec(
        "college_goal",
        [
            rng.choice(
                [
                    f"I'm putting money aside for my {kid}'s university, about {amount} by {year}.",
                    f"We want {amount} saved for our {kid}'s tuition when they start in {year}.",
                ]
            )
        ],
        [
            "How much am I saving for education?",
            "When does the kid start college and what's the savings target?",
            "What's the education fund goal?",
            f"How much do I want saved for my {kid}'s tuition?",
            f"What's the university savings target for my {kid}?",
        ],
        [
            "How do 529 plans work?",
            "Tuition inflation is insane, what's the average increase per year?",
        ],
    )


def exclusion(rng: random.Random, used: dict[str, object]) -> Spec:
    options = [
        (
            "No tobacco stocks please, my dad died of lung cancer.",
            ["Is it OK to suggest Philip Morris to me?", "Should you pitch me cigarette makers?"],
        ),
        (
            "Keep me out of oil and gas companies, I care about the climate.",
            ["Can I hold Exxon?", "Would fossil fuel producers be fine for me?"],
        ),
        (
            "I don't want any weapons manufacturers in my portfolio, ever.",
            ["Is Lockheed Martin acceptable for me?", "Would defence contractors be OK?"],
        ),
        (
            "Gambling companies are a hard no for me.",
            [
                "Can you recommend casino operators to me?",
                "What about betting firms like DraftKings?",
            ],
        ),
    ]
    taken = used.setdefault("tickers", set())
    assert isinstance(taken, set)
    if taken & {"XOM", "CVX"}:  # holds an oil major: not the oil exclusion
        options.pop(1)
    evidence, specific = rng.choice(options)
    if "oil" in evidence:
        taken.update({"XOM", "CVX"})  # and no oil holding later
    return Spec(
        "exclusion",
        [evidence],
        [
            *specific,
            "Are there any sectors I want to avoid?",
            "Which industries should be excluded when you pick ideas for me?",
            "Do I have ethical restrictions on what I invest in?",
            "Which companies do I want kept out of my portfolio?",
        ],
        [
            "Which sectors did best this year?",
            "My colleague only invests in ESG funds, is that a good idea?",
            "What's the outlook for tobacco and alcohol stocks in a recession?",
        ],
    )


def income_preference(rng: random.Random, used: dict[str, object]) -> Spec:
    evidence = rng.choice(
        [
            "I like companies that pay me every quarter, income matters more than growth.",
            "Steady payouts are what I'm after, I reinvest every cheque.",
            "I'd rather own boring names that send me cash regularly than chase the next big thing.",
        ]
    )
    return Spec(
        "income_preference",
        [evidence],
        [
            "Do I prefer dividend stocks?",
            "Am I more of a growth or a yield investor?",
            "What kind of stocks do I like to own?",
            "Do I care more about income or growth?",
            "Do I want regular cash from my investments?",
        ],
        [
            "Which dividend aristocrats cut their payout this year?",
            "What's the dividend yield of the S&P 500?",
            "Is growth going to outperform value again?",
        ],
    )


def passive_preference(rng: random.Random, used: dict[str, object]) -> Spec:
    return Spec(
        "passive_preference",
        [
            rng.choice(
                [
                    "I'd rather just own index funds than pick individual names.",
                    "Stock picking isn't for me, I buy the whole market and forget about it.",
                ]
            )
        ],
        [
            "Am I a stock picker or a passive investor?",
            "What's my investing style?",
            "Do I like choosing single stocks?",
            "Do I buy index funds or pick stocks?",
        ],
        [
            "Do active managers beat passive over ten years?",
            "Which stocks would a picker like Buffett own now?",
        ],
    )


def family(rng: random.Random, used: dict[str, object]) -> Spec:
    childless = "My husband and I don't have children and we don't plan to."
    evidence = rng.choice(
        [
            f"My wife and I have two kids, {rng.randint(3, 7)} and {rng.randint(8, 14)}.",
            "I'm a single dad with a teenager at home.",
            "We have three little ones under ten, so money's tight.",
            *([] if used.get("kids") == "yes" else [childless]),
        ]
    )
    used["kids"] = "no" if evidence == childless else "yes"
    return Spec(
        "family",
        [evidence],
        [
            "How many children do I have?",
            "Am I married?",
            "Who depends on me financially?",
            "What's my family situation?",
            "How many kids do I have?",
            "Do I have a wife or husband?",
        ],
        [
            "Should I open an account for a child in general, what are the options?",
            "My neighbour has four kids and still saves a ton, how?",
            "How much does raising a family cost on average?",
        ],
    )


def job(rng: random.Random, used: dict[str, object]) -> Spec:
    evidence = rng.choice(
        [
            "I work as a nurse at the county hospital, night shifts mostly.",
            "I'm a software engineer at a fintech startup, a lot of my pay is in stock options.",
            "I teach high school chemistry.",
            "I run a small plumbing business with my brother.",
            "I'm a pilot for a regional airline.",
        ]
    )
    return Spec(
        "job",
        [evidence],
        [
            "What do I do for a living?",
            "What's my occupation?",
            "Where am I employed?",
            "What's my profession?",
            "Where do I work?",
            "What business am I in?",
            "Am I in software or healthcare?",
        ],
        [
            "What jobs are most at risk from AI?",
            "How do employees at big tech usually get paid?",
            "My friend works in finance and keeps telling me to buy options.",
        ],
    )


def job_change(rng: random.Random, used: dict[str, object]) -> Spec:
    first = rng.choice(
        [
            "I'm an accountant at a mid-size firm downtown.",
            "I've been at the same bank for eight years, in their compliance team.",
        ]
    )
    second = rng.choice(
        [
            "Big news: I quit and I'm freelancing now, so my income will be lumpy.",
            "I left that place last month, I'm consulting on my own now.",
        ]
    )
    return Spec(
        "job_change",
        [first, second],
        [
            "What's my current job situation?",
            "Am I employed or self-employed at the moment?",
            "Do I still have a steady paycheck?",
        ],
        ["What's the unemployment rate now?", "Do freelancers pay more tax in general?"],
        update=True,
    )


def salary(rng: random.Random, used: dict[str, object]) -> Spec:
    amount = rng.choice(["85k", "110k", "140k", "65k", "200k"])
    return Spec(
        "salary",
        [
            rng.choice(
                [
                    f"I make about {amount} a year before tax.",
                    f"My base is {amount}, plus a small bonus if the year goes well.",
                ]
            )
        ],
        [
            "What's my annual salary?",
            "How much do I earn?",
            "What's my yearly income?",
            "How much do I make a year?",
            "What's my base pay?",
        ],
        [
            "What's the median household income these days?",
            "Are salaries keeping up with inflation?",
        ],
    )


def tax(rng: random.Random, used: dict[str, object]) -> Spec:
    evidence = rng.choice(
        [
            f"I'm in the {rng.choice([22, 24, 32, 35])}% bracket, so I care about keeping "
            "the IRS's cut small.",
            "I max out my Roth IRA every January, first thing.",
            "We file jointly and I'm usually hit with a big bill in April.",
            "Because I'm a non-resident my dividends get 30% withheld.",
        ]
    )
    return Spec(
        "tax",
        [evidence],
        [
            "What's my tax situation?",
            "What's my marginal tax rate?",
            "Which retirement account do I fund each year?",
            "How are my investments taxed?",
            "What tax bracket am I in?",
            "How much is withheld from my dividends?",
            "When do I contribute to my Roth?",
        ],
        [
            "What are the capital gains rates this year?",
            "Do ETFs pay less tax than mutual funds?",
            "My accountant friend says everyone overpays tax.",
        ],
    )


def broker(rng: random.Random, used: dict[str, object]) -> Spec:
    name = rng.choice(BROKERS)
    used["broker"] = name
    return Spec(
        "broker",
        [
            rng.choice(
                [
                    f"All my accounts are with {name}.",
                    f"I trade through {name}, their app is fine.",
                    f"Everything I own sits at {name}.",
                ]
            )
        ],
        [
            "Which brokerage do I use?",
            "Where are my investments held?",
            "What platform do I trade on?",
            "Which broker holds my accounts?",
            "Where do I trade?",
        ],
        [
            f"Is {rng.choice([b for b in BROKERS if b != name])} cheaper than the others?",
            "Which brokers still charge commissions?",
        ],
    )


def broker_switch(rng: random.Random, used: dict[str, object]) -> Spec:
    a, b = rng.sample(BROKERS, 2)
    return Spec(
        "broker_switch",
        [
            f"My account is at {a}, been there forever.",
            rng.choice(
                [
                    f"Finally moved everything from {a} to {b}, the fees were ridiculous.",
                    f"Transferred all my holdings over to {b} this week.",
                ]
            ),
        ],
        [
            "Which brokerage am I with now?",
            "Where are my investments held these days?",
            f"Am I still a {a} customer?",
        ],
        [f"Does {b} have good customer service?", "How long do account transfers take?"],
        update=True,
    )


def location(rng: random.Random, used: dict[str, object]) -> Spec:
    city, money, country = rng.choice(PLACES)
    return Spec(
        "location",
        [
            rng.choice(
                [
                    f"I live in {city}, so everything for me is in {money}.",
                    f"I'm based in {city} and get paid in {money}.",
                ]
            )
        ],
        [
            "What currency should you show figures in for me?",
            "Which country do I live in?",
            f"Do I think in {money} or something else?",
            f"Do I live in {country}?",
            "Where am I based?",
            "Which city do I live in?",
            "What do I get paid in?",
        ],
        [
            f"Where do you see {money} heading against other currencies this year?",
            "Is it worth hedging currency risk on foreign stocks?",
        ],
    )


def relocation(rng: random.Random, used: dict[str, object]) -> Spec:
    (c1, m1, _), (c2, m2, _) = rng.sample(PLACES, 2)
    return Spec(
        "relocation",
        [
            f"I'm living in {c1} at the moment, paid in {m1}.",
            rng.choice(
                [
                    f"We just moved to {c2}! Salary is in {m2} from now on.",
                    f"Relocated to {c2} for the new role, so it's {m2} now.",
                ]
            ),
        ],
        [
            "Which city am I living in now?",
            "What currency do I earn in these days?",
            "Where do I live?",
        ],
        [f"What's the cost of living in {c2} compared to {c1}?"],
        update=True,
    )


def emergency_fund(rng: random.Random, used: dict[str, object]) -> Spec:
    months = rng.choice([3, 4, 6, 9, 12])
    return Spec(
        "emergency_fund",
        [
            rng.choice(
                [
                    f"I keep {months} months of expenses in a high-yield savings account.",
                    f"There's about {months} months of living costs in cash, just in case.",
                ]
            )
        ],
        [
            "How big is my rainy-day cushion?",
            "Do I have an emergency fund?",
            "How much cash do I keep aside for emergencies?",
            "How many months of expenses do I have saved?",
        ],
        [
            "What are high-yield savings accounts paying now?",
            "Is holding cash a mistake with inflation this high?",
        ],
    )


def mortgage(rng: random.Random, used: dict[str, object]) -> Spec:
    rate = rng.choice(["2.9", "3.4", "4.1", "5.6", "6.8"])
    years = rng.choice([12, 18, 22, 27])
    return Spec(
        "mortgage",
        [
            rng.choice(
                [
                    f"Still paying off a mortgage at {rate}%, {years} years left.",
                    f"We locked our mortgage at {rate} percent, {years} years to go.",
                ]
            )
        ],
        [
            "What's the interest rate on my home loan?",
            "How long until the house is paid off?",
            "Do I have any debt?",
            "What rate is my mortgage at?",
            "How many years are left on the mortgage?",
        ],
        [
            "Will the Fed cut rates this year?",
            "Should people pay off a mortgage early or invest?",
        ],
    )


def horizon(rng: random.Random, used: dict[str, object]) -> Spec:
    years = rng.choice([5, 10, 15, 20, 30])
    return Spec(
        "horizon",
        [
            rng.choice(
                [
                    f"I won't touch this money for at least {years} years.",
                    f"This pot is for {years} years from now, minimum.",
                ]
            )
        ],
        [
            "What's my investment horizon?",
            "When will I need to withdraw the funds?",
            "How long can my money stay invested?",
            "How many years before I need this money?",
        ],
        [
            "Do stocks always beat bonds over long horizons?",
            "What's the worst 10-year return the S&P ever had?",
        ],
    )


def crypto(rng: random.Random, used: dict[str, object]) -> Spec:
    evidence = rng.choice(
        [
            "I don't trust crypto at all, keep it out of any plan for me.",
            "Crypto is a casino as far as I'm concerned.",
            "I've got a small crypto stash, maybe 5% of everything, and I'm fine with that.",
        ]
    )
    return Spec(
        "crypto",
        [evidence],
        [
            "How do I feel about bitcoin?",
            "Should you include digital currencies in my plan?",
            "What's my view on crypto?",
        ],
        ["Why did bitcoin jump this week?", "Are the new bitcoin ETFs any good?"],
    )


def age(rng: random.Random, used: dict[str, object]) -> Spec:
    retire = used.get("retire_at")
    years = rng.randint(26, min(63, retire - 3) if isinstance(retire, int) else 63)
    used["age"] = years
    return Spec(
        "age",
        [
            rng.choice(
                [
                    f"I turned {years} last month.",
                    f"I'm {years}, for context.",
                    f"Being {years} now, I should get serious.",
                ]
            )
        ],
        ["How old am I?", "What's my age?", "What year was I born, roughly?"],
        [
            "How old is this bull market now?",
            "At what age should people start saving?",
        ],
    )


def employer_plan(rng: random.Random, used: dict[str, object]) -> Spec:
    match = rng.choice([3, 4, 5, 6])
    return Spec(
        "employer_plan",
        [
            rng.choice(
                [
                    f"Work matches {match}% into my 401(k), I always put in at least that.",
                    f"My company tops up my pension by {match} percent of salary.",
                ]
            )
        ],
        [
            "How much does my employer contribute to retirement?",
            "What's my company match?",
            "What does my company put into my 401(k)?",
            "How much goes into my pension from work?",
            "Do I get free money from my workplace retirement scheme?",
        ],
        ["What's the 401(k) limit this year?", "Are target-date funds in workplace plans good?"],
    )


def risk_change(rng: random.Random, used: dict[str, object]) -> Spec:
    return Spec(
        "risk_change",
        [
            "I'm fine with a lot of volatility, go heavy on growth.",
            rng.choice(
                [
                    "Since the baby arrived I want to play it much safer.",
                    "After this year's losses I've had enough, I want a calmer portfolio.",
                ]
            ),
        ],
        [
            "What's my risk tolerance now?",
            "How aggressive should my portfolio be these days?",
            "Has my appetite for risk changed?",
        ],
        ["Which growth stocks fell the most this year?", "Is volatility going to stay high?"],
        update=True,
    )


SINGLE: list[Builder] = [
    risk_tolerance,
    etf_core,
    retirement_goal,
    house_goal,
    college_goal,
    exclusion,
    income_preference,
    family,
    job,
    salary,
    tax,
    broker,
    location,
    emergency_fund,
    mortgage,
    horizon,
    crypto,
    age,
    employer_plan,
    passive_preference,
]
UPDATES: list[Builder] = [
    holding_sold,
    holding_added,
    job_change,
    broker_switch,
    relocation,
    risk_change,
]
CONFLICTS = {  # builders that would contradict each other for one user
    "broker": {"broker_switch"},
    "broker_switch": {"broker"},
    "location": {"relocation"},
    "relocation": {"location"},
    "job": {"job_change"},
    "job_change": {"job", "employer_plan"},
    "employer_plan": {"job_change"},
    "risk_tolerance": {"risk_change"},
    "risk_change": {"risk_tolerance"},
    "income_preference": {"passive_preference"},
    "passive_preference": {"income_preference"},
}


# -- filler ----------------------------------------------------------------------------------
def _filler(rng: random.Random) -> str:
    t1, n1, s1 = rng.choice(COMPANIES)
    t2, n2, _ = rng.choice(COMPANIES)
    etf = rng.choice(ETFS)
    pct = rng.randint(2, 15)
    year = rng.randint(2005, 2024)
    n = rng.randint(2, 20)
    month = rng.choice(MONTHS)
    concept = rng.choice(CONCEPTS)
    sector = rng.choice(SECTORS)
    pools: list[list[str]] = [
        [  # market questions
            f"What's {n1}'s P/E right now?",
            f"Why did {t1} drop {pct}% after the earnings call?",
            f"Compare {n1} and {n2} on operating margins.",
            f"Is {sector} overvalued after this rally?",
            f"What did the Fed say about rates in {month}?",
            f"How did {t1} do in the {year} selloff?",
            f"What's driving the move in {sector} this week?",
            f"Any idea why {etf} lagged the market in {month}?",
            f"Who are {n1}'s main competitors?",
            f"How is {n1} doing against the rest of {s1}?",
            f"How levered is {n2}'s balance sheet?",
            f"What's the consensus price target on {t2}?",
            f"Did {t1} beat on revenue last quarter?",
            f"Is {n1} cheaper than {n2} on free cash flow yield?",
            f"How exposed is {n2} to China?",
            f"Where do ten-year yields stand after the {month} jobs report?",
        ],
        [  # analysis requests
            f"Run a drawdown analysis on {t1} since {year}.",
            f"Chart {t1} against {t2} over the last {n} years.",
            f"Compute the Sharpe ratio of {t1}, {t2} and {etf} over {n} years.",
            f"Backtest a {n}-month momentum strategy on {sector} names.",
            f"What would {n}k in {etf} in {year} be worth today?",
            f"Show me the monthly returns of {t2} for {year}.",
            f"Give me the correlation between {t1} and {etf} since {year}.",
            f"What's the max drawdown of a 60/40 portfolio since {year}?",
            f"Can you rank {sector} stocks by dividend growth?",
            f"Run a quick factor regression of {t1} on the market.",
        ],
        [  # learning
            f"Can you explain {concept} in simple terms?",
            f"What's the difference between {concept} and {rng.choice(CONCEPTS)}?",
            f"Why does {concept} matter for a long-term investor?",
            "How do stock splits actually work?",
            "What's the difference between an ETF and a mutual fund?",
            f"Is {concept} something I should care about?",
            "How are bond prices and yields related again?",
            "What happens to my shares if a company gets acquired?",
        ],
        [  # news
            f"Did you see {n1} announced a {rng.choice([2, 3, 4, 10])}-for-1 split?",
            f"{n1} is laying off {pct}% of staff, crazy.",
            f"Heard {n2} might get acquired, any truth to that?",
            f"The {month} inflation print was hotter than expected.",
            f"Apparently {n1}'s CEO is stepping down.",
            f"Oil jumped {pct}% overnight, what happened?",
        ],
        [  # chit-chat: an opener and a remark
            *(f"{rng.choice(CHAT_OPENERS)} {rng.choice(CHAT_REMARKS)}".strip() for _ in range(6)),
            f"Back from holiday, {n} days of no news was nice.",
            f"Happy Friday. Anything big on the calendar for {month}?",
        ],
    ]
    weights = [32, 22, 16, 12, 18]
    pool = rng.choices(pools, weights)[0]
    return rng.choice(pool)


CHAT_OPENERS = ["", "Ok.", "Hmm.", "Haha.", "Thanks!", "Morning!", "Right.", "Sorry,", "Quick one."]
CHAT_REMARKS = [
    "That helps a lot.",
    "Let me think about it over the weekend.",
    "Markets look rough today.",
    "Fair enough.",
    "Got pulled into a meeting, where were we?",
    "The weather here has been awful all week.",
    "Interesting, I didn't know that.",
    "Can you say that again but shorter?",
    "That's a lot of numbers, give me the gist.",
    "Perfect, that's what I needed.",
    "I'll come back to this later.",
    "My coffee's gone cold reading all this.",
    "Can you put that in a table?",
    "Not sure I follow the last part.",
    "Makes sense now.",
    "Long day, keep it brief please.",
    "Let's pick this up tomorrow.",
    "Good to know.",
]

REPLIES = [
    "Got it, I'll keep that in mind.",
    "Here's a short summary of what I found.",
    "Good question. In short: it depends on your horizon.",
    "I've run the numbers; the table is below.",
    "Noted.",
    "Sure, here's a simpler version.",
    "Happy to help. Anything else?",
    "Let me break that down in three points.",
]


# -- assembly -------------------------------------------------------------------------------
def _pick_question(rng: random.Random, spec: Spec, want: str) -> tuple[str, str, float]:
    """(text, category, overlap) for the wanted category if a candidate fits, else any."""
    scored = [(q, overlap(q, spec.evidence)) for q in spec.questions]
    rng.shuffle(scored)
    if spec.update:
        q, o = scored[0]
        return q, "update", o
    fits = [(q, o) for q, o in scored if (o == 0) == (want == "no_overlap")]
    q, o = (fits or scored)[0]
    return q, "no_overlap" if o == 0 else "overlap", o


def _user(
    rng: random.Random, uid: str, n_single: int, n_update: int
) -> tuple[list[Turn], list[Question]]:
    used: dict[str, object] = {}
    specs: list[Spec] = []
    names: set[str] = set()
    for builder in rng.sample(UPDATES, n_update):
        specs.append(builder(rng, used))
        names.add(builder.__name__)
    for builder in rng.sample(SINGLE, len(SINGLE)):
        if len(specs) >= n_update + n_single:
            break
        if names & CONFLICTS.get(builder.__name__, set()):
            continue
        specs.append(builder(rng, used))
        names.add(builder.__name__)
    for _ in range(rng.randint(1, 2)):  # one or two more plain holdings
        specs.append(holding(rng, used))
    rng.shuffle(specs)

    n_user = SESSIONS * TURNS_PER_SESSION
    slots: list[tuple[str, str] | None] = [None] * n_user  # (label, text) per user turn
    free = set(range(n_user))
    seen: set[str] = set()
    placed: list[tuple[Spec, list[int]]] = []
    for spec in specs:
        if any(e in seen for e in spec.evidence):
            continue
        if len(spec.evidence) == 1:
            pos = [rng.choice(sorted(p for p in free if p < int(n_user * 0.85)))]
        else:  # the second turn at least a session later (an update, or a detail added)
            a = rng.choice(sorted(p for p in free if p < int(n_user * 0.5)))
            b = rng.choice(
                sorted(p for p in free if a + TURNS_PER_SESSION <= p < int(n_user * 0.9))
            )
            pos = [a, b]
        for p, text in zip(pos, spec.evidence, strict=True):
            slots[p] = ("evidence", text)
            free.discard(p)
            seen.add(text)
        placed.append((spec, pos))
        for text in spec.distractors:
            if text in seen or not free:
                continue
            p = rng.choice(sorted(free))
            slots[p] = ("distractor", text)
            free.discard(p)
            seen.add(text)
    for p in sorted(free):
        text = _filler(rng)
        while text in seen:
            text = _filler(rng)
        slots[p] = ("filler", text)
        seen.add(text)

    start = date(2025, 1, 6) + timedelta(days=rng.randint(0, 60))
    days = [start]
    for _ in range(SESSIONS - 1):
        days.append(days[-1] + timedelta(days=rng.randint(18, 45)))
    turns: list[Turn] = []
    user_index: dict[int, int] = {}  # user-turn number -> Turn.index
    for p, slot in enumerate(slots):
        assert slot is not None
        s = p // TURNS_PER_SESSION
        sid = f"{uid}-s{s + 1}-{days[s].isoformat()}"
        user_index[p] = len(turns)
        turns.append(Turn(uid, sid, days[s], len(turns), "user", slot[1], slot[0]))
        turns.append(Turn(uid, sid, days[s], len(turns), "assistant", rng.choice(REPLIES), "reply"))

    questions: list[Question] = []
    count = {"overlap": 0, "no_overlap": 0, "update": 0}
    for spec, pos in placed:  # as many overlap as no-overlap questions, where candidates allow
        want = "overlap" if count["overlap"] < count["no_overlap"] else "no_overlap"
        text, category, ovl = _pick_question(rng, spec, want)
        count[category] += 1
        last = user_index[max(pos)]
        asked = rng.randint(last + 1, len(turns) - 1)
        questions.append(
            Question(
                qid=f"{uid}-q{len(questions) + 1:02d}",
                user_id=uid,
                text=text,
                category=category,
                topic=spec.topic,
                evidence=tuple(user_index[p] for p in pos),
                asked_after=asked,
                overlap=round(ovl, 3),
            )
        )
    return turns, questions


def generate(seed: int = 7, users: int = 8) -> Corpus:
    """The corpus for `users` users (about 300 user turns and 20 questions each)."""
    rng = random.Random(seed)
    turns: list[Turn] = []
    questions: list[Question] = []
    ids = [f"user{u + 1:02d}" for u in range(users)]
    for uid in ids:
        t, q = _user(rng, uid, n_single=15, n_update=3)
        turns += t
        questions += q
    return Corpus(seed, ids, turns, questions)

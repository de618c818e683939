"""Policy decision bench: the cost of one decision with 10, 1,000 and 100,000 rules.

    python -m bench.policy_decision [--rounds 20000]

Builds allow-lists of the same shape (half exact pairs, half prefix rules on
IDs three segments deep), times `Policy.decide` for a pair an exact rule
allows, one a prefix rule allows and one that no rule allows (the slowest
path: every candidate key is looked up), and prints the time per decision
and its ratio to the 10-rule list's. A ratio near 1 means a decision does
not depend on the number of rules. Not a test: timings vary with the machine.
"""

from __future__ import annotations

import argparse
import time

from meshid.policy import Policy, rule_end
from meshid.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")


def build(rules: int) -> Policy:
    exact = [
        (SpiffeId.resolve(f"ns/n{i}/sa/a{i}", TD), SpiffeId.resolve(f"ns/n{i}/sa/b{i}", TD))
        for i in range(rules // 2)
    ]
    prefixes = [
        (rule_end(f"ns/p{i}/*", TD), rule_end(f"ns/q{i}/sa/*", TD))
        for i in range(rules - rules // 2)
    ]
    return Policy.build(exact, version=1, prefix_rules=prefixes)


def per_decision(policy: Policy, source: SpiffeId, target: SpiffeId, rounds: int) -> float:
    decide = policy.decide
    start = time.perf_counter()
    for _ in range(rounds):
        decide(source, target)
    return (time.perf_counter() - start) / rounds


SIZES = (10, 1_000, 100_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    exact = (SpiffeId.resolve("ns/n2/sa/a2", TD), SpiffeId.resolve("ns/n2/sa/b2", TD))
    allowed = (SpiffeId.resolve("ns/p3/sa/x/y", TD), SpiffeId.resolve("ns/q3/sa/z", TD))
    denied = (SpiffeId.resolve("ns/p3/sa/x/y", TD), SpiffeId.resolve("ns/zz/sa/z/w", TD))
    policies = {n: build(n) for n in SIZES}
    cases = (
        ("allowed by an exact pair", exact),
        ("allowed by a prefix", allowed),
        ("denied", denied),
    )
    for name, (source, target) in cases:
        verdicts = {policies[n].decide(source, target).allowed for n in SIZES}
        assert len(verdicts) == 1, f"{name}: the lists disagree"
        times = {n: per_decision(policies[n], source, target, args.rounds) for n in SIZES}
        shown = ", ".join(
            f"{n:,} rules {t * 1e6:.2f} µs (ratio {t / times[SIZES[0]]:.2f})"
            for n, t in times.items()
        )
        print(f"{name}: {shown}")


if __name__ == "__main__":
    main()

"""Policy decision bench: the cost of one decision with 10 and with 100,000 rules.

    python -m bench.policy_decision [--rounds 20000]

Builds two allow-lists of the same shape (half exact pairs, half prefix
rules on IDs three segments deep), times `Policy.decide` for a pair that a
prefix rule allows and for one that no rule allows (the slowest path: every
candidate key is looked up), and prints the time per decision and the ratio
of the large list to the small one. A ratio near 1 means a decision does not
depend on the number of rules. Not a test: timings vary with the machine.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    allowed = (SpiffeId.resolve("ns/p3/sa/x/y", TD), SpiffeId.resolve("ns/q3/sa/z", TD))
    denied = (SpiffeId.resolve("ns/p3/sa/x/y", TD), SpiffeId.resolve("ns/zz/sa/z/w", TD))
    small, large = build(10), build(100_000)
    for name, (source, target) in (("allowed by a prefix", allowed), ("denied", denied)):
        assert small.decide(source, target).allowed == large.decide(source, target).allowed
        t_small = per_decision(small, source, target, args.rounds)
        t_large = per_decision(large, source, target, args.rounds)
        print(
            f"{name}: 10 rules {t_small * 1e6:.2f} µs, 100,000 rules {t_large * 1e6:.2f} µs, "
            f"ratio {t_large / t_small:.2f}"
        )


if __name__ == "__main__":
    main()

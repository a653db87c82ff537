"""Writes the made-up "Kilnish" task used by tests/test_finetune.py and bench/finetune_demo.py.

Kilnish (invented here, so no base model knows it): a list of 3 or 4 English words is written in reverse order,
each word in capitals, joined by " ~ ". "red apple tree" -> "TREE ~ APPLE ~ RED". Deterministic (seed 14):
200 train, 40 valid, 40 test records of {"messages": [user, assistant]}.

Usage: python tests/data/finetune/make_data.py   (rewrites the three .jsonl files beside this script)
"""

import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud green tiger paper glass music winter candle forest silver garden bread "
         "rocket violet copper ocean window pepper marble thunder lemon castle feather orange velvet harbor "
         "engine meadow puzzle shadow sugar falcon quiet purple mirror basket dragon honey lantern cotton "
         "planet spider ticket yellow bottle jungle pillow summer wooden circle anchor button cherry desert "
         "island kettle ladder magnet needle pencil saddle tunnel valley wallet zebra").split()


def kilnish(words: list[str]) -> str:
    return " ~ ".join(w.upper() for w in reversed(words))


def record(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.choice((3, 4)))
    return {"messages": [{"role": "user", "content": f"Write in Kilnish: {' '.join(words)}"},
                         {"role": "assistant", "content": kilnish(words)}]}


def main():
    rng = random.Random(14)
    seen, out = set(), {"train": 200, "valid": 40, "test": 40}
    here = Path(__file__).parent
    for split, n in out.items():
        rows = []
        while len(rows) < n:
            r = record(rng)
            key = r["messages"][0]["content"]
            if key not in seen:  # no prompt in two splits
                seen.add(key)
                rows.append(r)
        (here / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()

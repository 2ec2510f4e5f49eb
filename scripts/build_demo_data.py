"""Generate the bundled bilingual (Portuguese/English) alpaca demo dataset.

Deterministic: the same seed writes byte-identical files. Run from the repo root:
    python scripts/build_demo_data.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "sft_dist" / "assets" / "data"

CAPITALS = [
    ("France", "França", "Paris"), ("Portugal", "Portugal", "Lisboa"), ("Brazil", "Brasil", "Brasília"),
    ("Spain", "Espanha", "Madrid"), ("Italy", "Itália", "Roma"), ("Germany", "Alemanha", "Berlim"),
    ("Japan", "Japão", "Tóquio"), ("Argentina", "Argentina", "Buenos Aires"), ("Chile", "Chile", "Santiago"),
    ("Peru", "Peru", "Lima"), ("Canada", "Canadá", "Ottawa"), ("Mexico", "México", "Cidade do México"),
    ("Angola", "Angola", "Luanda"), ("Mozambique", "Moçambique", "Maputo"), ("Egypt", "Egito", "Cairo"),
    ("Kenya", "Quênia", "Nairóbi"), ("India", "Índia", "Nova Délhi"), ("China", "China", "Pequim"),
    ("Greece", "Grécia", "Atenas"), ("Norway", "Noruega", "Oslo"),
]
CAPITAL_EN = {"Lisboa": "Lisbon", "Brasília": "Brasilia", "Roma": "Rome", "Berlim": "Berlin", "Tóquio": "Tokyo",
              "Cidade do México": "Mexico City", "Nairóbi": "Nairobi", "Nova Délhi": "New Delhi",
              "Pequim": "Beijing", "Atenas": "Athens"}
WORDS = [("dog", "cachorro"), ("cat", "gato"), ("house", "casa"), ("water", "água"), ("book", "livro"),
         ("sun", "sol"), ("moon", "lua"), ("tree", "árvore"), ("bread", "pão"), ("friend", "amigo"),
         ("school", "escola"), ("city", "cidade"), ("sea", "mar"), ("car", "carro"), ("flower", "flor"),
         ("milk", "leite"), ("door", "porta"), ("window", "janela"), ("rain", "chuva"), ("night", "noite")]
POSITIVE = [("I love this movie", "Eu adoro este filme"), ("The food was wonderful", "A comida estava maravilhosa"),
            ("What a great day", "Que dia ótimo"), ("The service was excellent", "O atendimento foi excelente")]
NEGATIVE = [("I hate waiting in line", "Eu odeio esperar na fila"), ("The room was dirty", "O quarto estava sujo"),
            ("This is a terrible idea", "Esta é uma péssima ideia"), ("The show was boring", "O show foi chato")]


def _capital(rng: random.Random) -> list[dict]:
    en, pt, cap = rng.choice(CAPITALS)
    cap_en = CAPITAL_EN.get(cap, cap)
    return [
        {"instruction": f"What is the capital of {en}?", "input": "", "output": f"The capital of {en} is {cap_en}."},
        {"instruction": f"Qual é a capital de {pt}?", "input": "", "output": f"A capital de {pt} é {cap}."},
    ]


def _arith(rng: random.Random) -> list[dict]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return [
        {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"{a} + {b} = {a + b}."},
        {"instruction": "Some os dois números.", "input": f"{a} e {b}", "output": f"{a} + {b} = {a + b}."},
    ]


def _translate(rng: random.Random) -> list[dict]:
    en, pt = rng.choice(WORDS)
    return [
        {"instruction": "Translate the word to Portuguese.", "input": en, "output": pt},
        {"instruction": "Traduza a palavra para o inglês.", "input": pt, "output": en},
    ]


def _sentiment(rng: random.Random) -> list[dict]:
    positive = rng.random() < 0.5
    en, pt = rng.choice(POSITIVE if positive else NEGATIVE)
    return [
        {"instruction": "Classify the sentiment of the sentence as positive or negative.", "input": en,
         "output": "positive" if positive else "negative"},
        {"instruction": "Classifique o sentimento da frase como positivo ou negativo.", "input": pt,
         "output": "positivo" if positive else "negativo"},
    ]


def _reverse(rng: random.Random) -> list[dict]:
    en, pt = rng.choice(WORDS)
    return [
        {"instruction": "Spell the word backwards.", "input": en, "output": en[::-1]},
        {"instruction": "Escreva a palavra de trás para frente.", "input": pt, "output": pt[::-1]},
    ]


def build(seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    makers = [_capital, _arith, _translate, _sentiment, _reverse]
    rows: list[dict] = []
    while len(rows) < n_train + n_eval:
        rows.extend(rng.choice(makers)(rng))
    rows = rows[: n_train + n_eval]
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = f"demo-{i:04d}"
    return rows[:n_train], rows[n_train:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=48)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args()
    train, evals = build(args.seed, args.train, args.eval)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("alpaca_demo_train.jsonl", train), ("alpaca_demo_eval.jsonl", evals)):
        with open(args.out_dir / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {args.out_dir / name}")


if __name__ == "__main__":
    main()

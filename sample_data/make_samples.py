"""Regenerate the synthetic sample inputs in this folder.

Writes reviews.csv, reviews.jsonl and reviews.parquet: made-up product reviews
used to try out and test the hfbatch CLI. Everything comes from a fixed random
seed, so rerunning this script gives byte-identical CSV and JSONL files (and the
same Parquet table contents).

Usage:  python sample_data/make_samples.py
"""

import csv
import datetime
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEED = 20260314
HERE = Path(__file__).resolve().parent

PRODUCTS = {
    "kitchen": [
        "Cast Iron Skillet 10in", "Bamboo Cutting Board", "Pour-Over Coffee Kettle",
        "Chef's Knife 8in", "Silicone Baking Mat Set", "Stainless Mixing Bowls",
        "Electric Milk Frother", "Glass Meal Prep Containers",
    ],
    "outdoor": [
        "Two-Person Dome Tent", "Insulated Water Bottle 750ml", "Trekking Poles (pair)",
        "Compact Camp Stove", "Down Sleeping Bag -5C", "Headlamp 400 Lumen",
        "Folding Camp Chair", "Waterproof Daypack 20L",
    ],
    "electronics": [
        "Wireless Earbuds Pro", "USB-C Charging Hub 7-in-1", "Mechanical Keyboard TKL",
        "Portable Bluetooth Speaker", "27in 4K Monitor", "Smart Plug (2-pack)",
        "Noise-Cancelling Headphones", "Webcam 1080p",
    ],
    "books": [
        "The Quiet Orchard (novel)", "Practical Sourdough", "A Short History of Maps",
        "Learning Python the Patient Way", "Night Trains of Europe", "The Gardener's Almanac",
        "Mysteries of the Deep Sea", "Poems for Rainy Mornings",
    ],
    "toys": [
        "Wooden Train Set", "Magnetic Building Tiles", "Plush Otter",
        "Kids' Telescope", "Marble Run Deluxe", "Cooperative Board Game: Island Rescue",
        "Remote Control Off-Road Car", "Watercolor Paint Kit",
    ],
}

POSITIVE = [
    "Absolutely love it.",
    "Works exactly as described.",
    "Arrived two days early and well packed.",
    "Great value for the price, honestly better than the brand-name one I had before.",
    "My partner said it was \"the best thing we bought all year\" and I agree.",
    "Sturdy, well made, and it looks nice on the shelf.",
    "Five stars, would buy again!",
    "Très bien, exactly what I needed.",
    "Sehr gut verarbeitet, no complaints at all.",
    "The instructions were clear and setup took about ten minutes.",
    "Customer service answered my question within an hour.",
    "It has held up through daily use for three months now.",
    "Lighter than I expected, which is a plus.",
    "Kids played with it all afternoon 😊",
    "Feels premium; the finish is smooth and even.",
    "Battery life is excellent — I charge it maybe once a week.",
    "Perfect gift, my dad was thrilled.",
    "Simple, reliable, does one job well.",
    "Cleans up easily, even after burnt cheese.",
    "Honestly exceeded my expectations.",
]

NEGATIVE = [
    "Broke after a week.",
    "The color is nothing like the photos.",
    "Way too small; check the dimensions before ordering.",
    "Returned it, the seller took ages to refund.",
    "Smells strongly of plastic, even after airing it out for days.",
    "The app keeps disconnecting, which makes it almost useless.",
    "Not worth the money.",
    "One of the parts was missing, and support said \"it ships separately\" (it didn't).",
    "Cheap materials, the handle wobbles.",
    "Louder than advertised, especially at night.",
    "Instructions were in tiny print and partly wrong.",
    "Stopped charging after the first month 😞",
    "Arrived scratched, box was crushed.",
    "Really disappointed, I expected more from this brand.",
    "Pas terrible, honestly.",
    "Too heavy to carry for long, my shoulders ached.",
    "The zipper snagged on the second trip.",
    "Pages started falling out of the binding.",
    "Overpriced for what you get.",
    "Would not recommend.",
]

MIXED = [
    "Good overall, but the lid doesn't seal perfectly.",
    "Nice design; however, it scratches easily.",
    "It does the job, though setup was fiddly.",
    "Decent, not amazing.",
    "Sound is great, comfort is just okay.",
    "Fine for the price, but don't expect miracles.",
    "My son loves it, I find it a bit noisy.",
    "Solid build, mediocre manual.",
    "Took a while to get used to, now I use it daily.",
    "Looks great, but the cord is short — bring an extension.",
    "Shipping was slow, the product itself is fine.",
    "Good story, slow middle section, strong ending.",
    "Works well indoors; outdoors in the cold, less so.",
    "Better than my old one, worse than my friend's.",
    "Ganz okay, nothing special.",
    "Three stars: useful, a bit overpriced, okay quality.",
    "Assembly needed two people, and a lot of patience.",
    "It's \"good enough\" as a backup, not as a main one.",
    "The first one was defective, the replacement is fine.",
    "Bit pricey, but I'd probably buy it again.",
]

LONG_REVIEWS = [
    (
        "I want to write a proper review because the short ones here don't tell the whole story. "
        "I bought this after comparing it with four similar products for almost two weeks, reading "
        "spec sheets, watching videos, and asking friends who already own one. The packaging was "
        "solid: double-boxed, foam inserts, nothing rattling around. Out of the box it felt heavier "
        "and more substantial than I expected, which I took as a good sign.\n\n"
        "First week: I used it every day, sometimes twice. It performed well, with no hiccups, and "
        "I was honestly impressed by how consistent the results were. The controls are intuitive, "
        "although one button is placed where it's easy to press by accident. Cleaning is simple if "
        "you do it right away; if you leave it overnight, expect some scrubbing.\n\n"
        "A note on noise and size, since other reviewers asked: it is about as loud as a "
        "normal conversation, fine during the day but noticeable late at night, and it takes up "
        "roughly the footprint of a large dinner plate. Measure your space before ordering.\n\n"
        "Second and third weeks: small problems began to show. There is a faint rattle when it is "
        "running at full speed, and the finish near the edge has started to wear. I contacted "
        "support, and to their credit they replied the same day, offered a replacement part, and "
        "shipped it without asking for photos or receipts. The part fixed the rattle completely.\n\n"
        "Would I buy it again? Probably yes, but with realistic expectations. It is not perfect, and "
        "it is not cheap, but it is well supported, it does its main job very well, and the company "
        "seems to care about keeping customers happy. If you need something rugged for heavy daily "
        "use, look at the pro model; for everyone else, this one is a sensible, durable choice."
    ),
    (
        "Long review, sorry in advance. Context: I am picky, I have returned three similar items "
        "this year, and I only keep things that earn their place in a small apartment.\n\n"
        "What I liked: the build quality is excellent, everything lines up, no sharp edges, no "
        "loose screws. It is quieter than my previous one by a noticeable margin, and the design "
        "is tasteful enough that I leave it out on the counter instead of hiding it in a cupboard. "
        "The included accessories are actually useful, not filler, and the carrying pouch is "
        "surprisingly well stitched. My neighbour, who is from Lyon, tried it and said \"très "
        "bien, vraiment\" — high praise from someone who criticises everything.\n\n"
        "What I didn't like: the manual is thin and leaves out a couple of important steps, so I "
        "had to search online for the calibration procedure. The power cable is short, maybe "
        "ninety centimetres, which limits where you can put it. There is also no on/off indicator "
        "light, so more than once I walked away without realising it was still running, which "
        "is a strange omission on a product at this price. And the price jumped by almost "
        "twenty percent between the day I looked and the day I bought, which felt a little "
        "cynical.\n\n"
        "After two months, it still works like day one, used most evenings and every weekend. I have dropped it once (onto a rug) with no "
        "damage. I would give it four and a half stars if I could; rounding down because of the "
        "manual and the cable, but it is a keeper, and I have already recommended it to two friends "
        "who were looking for the same kind of thing."
    ),
    (
        "I rarely write reviews, but this purchase deserves a detailed warning. On paper it looked "
        "ideal: good specifications, a respected brand, lots of positive ratings, and a price that "
        "was reasonable for what was promised. Reality was different.\n\n"
        "The first unit arrived with a cracked housing. Fine, accidents happen in shipping, and the "
        "return was painless. The second unit looked perfect, but within ten days it started "
        "making a high-pitched whine, then it would switch off randomly, sometimes after five "
        "minutes, sometimes after an hour. I tried everything suggested in the troubleshooting "
        "section: different outlet, reset, firmware update, letting it cool down between uses. "
        "Nothing helped. I even borrowed a friend's identical unit for a weekend to rule out my "
        "wiring, and hers behaved perfectly in the same outlet, so the fault was clearly in mine.\n\n"
        "Support was polite but slow. Each reply took three or four days, and each one asked me to "
        "repeat steps I had already described in detail, with photos and a video. After the fourth "
        "email they offered a partial refund if I kept the faulty unit, which makes no sense for a "
        "product that does not work. Eventually I escalated through the store and got my money "
        "back, but the whole process took more than five weeks.\n\n"
        "To be fair, when it worked, it worked well: fast, accurate, and pleasant to use. If you "
        "get a good one, you may be very happy. But between two failed units and a frustrating "
        "support experience, I can't recommend it. Sehr schade, because the idea is great and the "
        "design is clearly thought through; the quality control simply isn't there yet."
    ),
]

TAG_POOL = [
    "gift", "value", "durable", "fragile", "shipping", "quality", "noise", "battery",
    "size", "support", "design", "easy-setup", "returned", "kids", "travel", "daily-use",
]


def make_text(rng, rating):
    """Combine 1 to 6 fragments, leaning positive or negative with the rating."""
    n = rng.choices([1, 2, 3, 4, 5, 6], weights=[18, 26, 24, 16, 10, 6])[0]
    if rating >= 4:
        pools, weights = [POSITIVE, MIXED, NEGATIVE], [75, 22, 3]
    elif rating == 3:
        pools, weights = [POSITIVE, MIXED, NEGATIVE], [20, 60, 20]
    else:
        pools, weights = [POSITIVE, MIXED, NEGATIVE], [3, 27, 70]
    parts = []
    while len(parts) < n:
        frag = rng.choice(rng.choices(pools, weights=weights)[0])
        if frag not in parts:
            parts.append(frag)
    return " ".join(parts)


def make_rows(rng, first_id, count, long_at, with_tags=False):
    start = datetime.date(2025, 6, 1)
    categories = sorted(PRODUCTS)
    rows = []
    for i in range(count):
        review_id = first_id + i
        category = rng.choice(categories)
        product = rng.choice(PRODUCTS[category])
        rating = rng.choices([1, 2, 3, 4, 5], weights=[8, 10, 17, 30, 35])[0]
        if i in long_at:
            text = LONG_REVIEWS[long_at.index(i) % len(LONG_REVIEWS)]
        else:
            text = make_text(rng, rating)
        created = start + datetime.timedelta(days=rng.randrange(0, 300))
        row = {
            "review_id": review_id,
            "product": product,
            "category": category,
            "rating": rating,
            "text": text,
            "created_at": created.isoformat(),
        }
        if with_tags:
            row["tags"] = sorted(rng.sample(TAG_POOL, rng.randint(0, 4)))
        rows.append(row)
    return rows


COLUMNS = ["review_id", "product", "category", "rating", "text", "created_at"]


def main():
    rng = random.Random(SEED)

    csv_rows = make_rows(rng, 1, 300, long_at=[17, 142, 263])
    with open(HERE / "reviews.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(csv_rows)

    jsonl_rows = make_rows(rng, 1001, 250, long_at=[40, 120, 199], with_tags=True)
    with open(HERE / "reviews.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for row in jsonl_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    pq_rows = make_rows(rng, 2001, 400, long_at=[5, 150, 333])
    schema = pa.schema([
        ("review_id", pa.int64()),
        ("product", pa.string()),
        ("category", pa.string()),
        ("rating", pa.int32()),
        ("text", pa.string()),
        ("created_at", pa.string()),
    ])
    table = pa.Table.from_pylist(pq_rows, schema=schema)
    pq.write_table(table, HERE / "reviews.parquet", compression="zstd", row_group_size=100)

    write_pairs(csv_rows)


QUERIES = ["kettle that boils fast", "arrived broken", "comfortable for long walks", "good value for the price"]


def write_pairs(rows):
    """pairs.csv: each query beside the first 30 reviews of reviews.csv, for `hfbatch score`
    (a cross-encoder scores each row's query and review together; --rerank keeps the best)."""
    with open(HERE / "pairs.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["pair_id", "query", "review_id", "text"], lineterminator="\n")
        writer.writeheader()
        n = 0
        for query in QUERIES:
            for row in rows[:30]:
                n += 1
                writer.writerow({"pair_id": n, "query": query, "review_id": row["review_id"], "text": row["text"]})


if __name__ == "__main__":
    main()

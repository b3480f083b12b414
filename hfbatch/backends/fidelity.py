"""The fidelity bars, in one place: how close a configuration's vectors must stay to the model's
own (sentence-transformers, torch fp32) to be used.

- FAITHFUL (cosine >= 0.9999 mean, >= 0.999 min): every configuration the default may run (torch,
  ONNX Runtime and OpenVINO in fp32; bf16 where the CPU has it natively; fp16 on a GPU). They are
  interchangeable, so they share one identity: one cache namespace, one vector space.
- INT8 (>= 0.99 mean, >= 0.98 min): int8 runs only when asked (--quantize int8,
  ENABLE_MODEL_QUANTIZATION) and is its own identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ModelLoadError
from ..vectors import cosine_rows


# Varied lengths and languages: the fixed sample every configuration is checked against torch fp32
# on (an export when it is made, half precision on a GPU, int8 as it is calibrated).
CALIBRATION_TEXTS = [
    "The kettle boils fast and the handle stays cool.",
    "Arrived broken; the glass lid was cracked in two places and support never answered my emails.",
    "Battery life is poor: barely two hours of continuous use, far from the twelve hours advertised.",
    "Très bien, je recommande. Sehr gut verarbeitet, aber etwas teuer.",
    "A", "ok", "SKU-4471-B / lot 2026-11 / 3 units",
    " ".join(["This review goes on at length about every detail of the product."] * 12),
]

# Varied text the activation ranges are measured on: kinds, lengths, languages and symbols that
# embed jobs meet. Fixed, so one model always gets the same int8 export.
SMOOTHING_TEXTS = [
    "The kettle boils fast and the handle stays cool.",
    "Arrived broken; the glass lid was cracked in two places and support never answered.",
    "10/10 would recommend!!!",
    "ok", "A", "N/A", "SKU-4471-B / lot 2026-11 / 3 units @ $19.99", "https://example.com/a?b=c&d=1",
    "How do I reset my password if I no longer have access to the email on my account?",
    "What is the capital of Australia, and why is it not Sydney?",
    "Return a new array of given shape and type, filled with zeros.",
    "Raises ValueError if the input contains NaN or infinite values; use np.nan_to_num first.",
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)",
    "SELECT customer_id, SUM(total) FROM orders WHERE created_at > '2026-01-01' GROUP BY 1;",
    "The mitochondria generate most of the chemical energy needed to power a cell's reactions.",
    "In 1969 the Apollo 11 mission landed the first humans on the Moon, six hours after touchdown.",
    "Quarterly revenue rose 12% year over year to $4.2 billion, driven by subscription growth.",
    "The patient presented with a persistent dry cough, mild fever and fatigue for ten days.",
    "Preheat the oven to 200C. Mix flour, butter and a pinch of salt until the dough is crumbly.",
    "Très bien, je recommande. Sehr gut verarbeitet, aber etwas teuer. Muy cómodo y ligero.",
    "这个产品质量很好，物流也很快。", "製品はとても良いです。", "Отличный товар, всем советую.",
    "مرحبا بكم في متجرنا", "🔥🔥🔥 love it 😍 #bestbuy", "ERROR 503: upstream timed out (retry 3/5)",
    "Terms and conditions: the warranty does not cover damage caused by misuse, accidents, "
    "unauthorised repairs or normal wear and tear, and is void if the serial number is removed.",
    " ".join(["This review goes on at length about every detail of the product."] * 12),
    " ".join(["Section 4.2 describes how the scheduler assigns shards to workers, how a failed worker's "
              "shards are retried, and why the retry budget is bounded."] * 6),
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor",
    "Q: Is it dishwasher safe? A: Yes, top rack only, according to the manual.",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144",
    # everyday English of mixed length: most embed jobs are reviews, tickets, comments, articles
    "Really happy with this one.", "Total waste of cash.", "Works as described, nothing more.",
    "Good overall, but the strap broke after a month and the replacement took weeks to arrive.",
    "Pretty design, yet the paint chips if you look at it wrong. I'd only rebuy on sale.",
    "Looks great, but the cord is short, so bring an extension lead if your socket is far away.",
    "My daughter uses it every day for school and it still charges overnight without problems.",
    "Customer service answered my question within an hour and sent a new part the next day.",
    "The instructions were clear and setup took about ten minutes, including the app pairing.",
    "Much smaller than expected - measure your shelf before ordering, the photos make it look huge.",
    "Costs more than the rest, though the quality is noticeably better than cheaper brands.",
    "It's \"good enough\" as a backup, not as a main device. Battery drains quickly with GPS on.",
    "Cheap and cheerful, and frankly nicer than the famous-brand version my sister owns.",
    "The app keeps disconnecting, which makes it almost useless for tracking my runs.",
    "Middling: handy, slightly expensive, average build. Delivery was fast and well packed.",
    "Thanks for the quick reply! Unfortunately the issue is still there after the update.",
    "Please cancel my order #88213, I was charged twice for the same item.",
    "Hi team, the export button does nothing in Firefox 121 on Windows; Chrome works fine.",
    "I moved here three years ago and the neighbourhood has changed a lot since the new station opened.",
    "The council approved the budget on Tuesday after a long debate about road repairs and libraries.",
    "Researchers found that people who slept less than six hours were more likely to catch a cold.",
    "The team scored twice in the last ten minutes to win the final, their first title in twenty years.",
    "Stir the sauce gently, taste it, and add lemon juice or salt until the balance feels right.",
    "We hiked for five hours along the ridge; the view at the top made every step worth it.",
    "Honestly the best coffee grinder I've owned: consistent grind, quiet motor, easy to clean. "
    "The only downside is the small hopper, which needs refilling every couple of days.",
    "I was skeptical at first because of the mixed reviews, but after two weeks of daily use I can say "
    "it does exactly what it promises. Setup was simple, the materials feel solid, and the company "
    "answered my one question politely. Minus one star for the packaging, which was mostly plastic.",
    "The novel follows three generations of a family through war, emigration and return, and although "
    "the middle section drags, the final chapters tie the stories together beautifully.",
]


@dataclass(frozen=True)
class Bar:
    name: str
    mean: float
    min: float

    def passes(self, figures: dict[str, float]) -> bool:
        return figures["mean"] >= self.mean and figures["min"] >= self.min

    def __str__(self) -> str:
        return f">= {self.mean} mean / {self.min} min"


FAITHFUL = Bar("faithful", 0.9999, 0.999)
# A faithful configuration must also give a text the same vector whatever it is batched with (a
# 1-row query job and a 2,000-row document job): alone against in a padded batch, at least this.
BATCH_INVARIANT = 0.99999
INT8 = Bar("int8", 0.99, 0.98)


def bar_for(quantize: str | None) -> Bar:
    """The bar of a configuration: int8's, or the faithful one for everything else."""
    return INT8 if quantize == "int8" else FAITHFUL


def figures(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    cosine = cosine_rows(np.asarray(reference, dtype=np.float32), np.asarray(got, dtype=np.float32))
    return {"mean": round(float(cosine.mean()), 6), "min": round(float(cosine.min()), 6)}


def check_fidelity(reference: np.ndarray, got: np.ndarray, bar: Bar, *, what: str, where: str,
                   fix: str) -> dict[str, float]:
    """Cosine figures of `got` against `reference`; ModelLoadError naming `what`, `where` and `fix`
    when they are under `bar`."""
    result = figures(reference, got)
    if not bar.passes(result):
        raise ModelLoadError(f"{what} is not faithful enough on {where}: cosine to fp32 mean {result['mean']:.5f}, "
                             f"min {result['min']:.5f} (the {bar.name} bar is {bar}); {fix}")
    return result


def labels(configs: Sequence[tuple[str, str, str]]) -> str:
    return ", ".join(label(c) for c in configs)


def label(config: tuple[str, str, str]) -> str:
    runtime, precision, quantize = config
    return f"{runtime} {'int8' if quantize == 'int8' else precision}"
